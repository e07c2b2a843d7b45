"""A local stand-in of the Tinker REST service, for tests of the worker's Tinker client.

It answers exactly what the `tinker` SDK 0.38 sends for the calls the worker makes: the
client configuration fetched when a `RestClient` is built, weights info, server
capabilities, and the signed URLs of an external weights checkpoint; and it serves the
checkpoint's files at those URLs until they expire (403 after). API requests must carry the
right `X-API-Key`.

It also trains, as Tinker does: sessions (create, heartbeat, finish), `create_model` (a LoRA
training run on a base model the test registered with `add_base_model`: a tiny model on
this machine, run by transformers and PEFT on the CPU), `forward_backward` and `forward`
(protobuf in and out, a real cross-entropy), `optim_step` (AdamW), `save_weights` (training
state, restored by `load_weights`), `save_weights_external` (only the LoRA tensors, named and
laid out as Tinker exports them), checkpoint deletion and TTLs, and the futures every one of
these answers with (`retrieve_future`). The work is done in the POST, under the run's lock,
so the futures are ready when asked for.

Every error is a 403 or 404 with a JSON body (or a failed future): the SDK retries 408, 409,
429, 5xx and a 400 without a body for up to 300 s, so the stand-in never answers those.
"""

import copy
import json
import secrets
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Self

import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.conftest import free_port, wait_until

DEFAULT_MODELS = [
    {"model_name": "meta-llama/Llama-3.2-1B", "max_context_length": 32768, "trainable": True, "sampleable": True},
    {"model_name": "Qwen/Qwen3-8B", "max_context_length": 32768, "trainable": True, "sampleable": False},
]


@dataclass
class StandinCheckpoint:
    """A checkpoint the stand-in knows; `files` maps each relative file name to its bytes
    (a hostile name such as `../evil.json` is served like any other)."""

    run_id: str
    name: str
    base_model: str
    files: dict[str, bytes]
    kind: str = "external_weights"
    lora_rank: int | None = 4
    train_unembed: bool | None = True
    train_mlp: bool | None = True
    train_attn: bool | None = True

    @property
    def tinker_path(self) -> str:
        return f"tinker://{self.run_id}/{self.kind}/{self.name}"


@dataclass
class SignedFile:
    content: bytes
    expires: datetime


# the scaling Tinker trains its LoRA with; an export says so in its adapter_config.json
LORA_ALPHA = 32
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


@dataclass
class TrainingRun:
    """One LoRA training run (`<session>:train:<n>`): the PEFT model, its AdamW, and what it
    was asked to do — `learning_rates` of every optim_step, `forward_backward_calls`, and
    `forward_calls` (no backward)."""

    model_id: str
    base_model: str
    rank: int
    model: Any
    lora_targets: tuple[bool, bool, bool]  # attention, MLP, unembedding
    lock: threading.Lock = field(default_factory=threading.Lock)
    optimizer: Any = None
    learning_rates: list[float] = field(default_factory=list)
    forward_backward_calls: int = 0
    forward_calls: int = 0

    def trainable(self) -> dict[str, Any]:
        return {name: parameter for name, parameter in self.model.named_parameters() if parameter.requires_grad}


@dataclass
class TrainingState:
    """A `weights` checkpoint (save_state): the LoRA weights and AdamW's state, in memory."""

    base_model: str
    rank: int
    train_attn: bool
    train_mlp: bool
    train_unembed: bool
    tensors: dict[str, Any]
    optimizer: dict[str, Any] | None


@dataclass
class TinkerStandin:
    """The stand-in on a free loopback port, served by uvicorn in a background thread.

    Tests set `url_lifetime` (how long signed URLs stay valid), `naive_expires` (send
    `expires` without a timezone), `supported_models`, `failing_files` (every signed file
    answers 404), call `revoke_signed_urls()` and `add_base_model()`, and read `requests`
    ("METHOD path" of every request received), `url_requests`, `file_requests`, `runs` (the
    training runs by model id), `deleted` (the checkpoint paths deleted) and `finished` (the
    sessions finished, with their status).
    """

    api_key: str = "tml-test-key"
    port: int = field(default_factory=free_port)
    url_lifetime: timedelta = timedelta(hours=1)
    naive_expires: bool = False
    supported_models: list[dict[str, Any]] = field(default_factory=lambda: list(DEFAULT_MODELS))
    checkpoints: dict[str, StandinCheckpoint] = field(default_factory=dict)
    requests: list[str] = field(default_factory=list)
    failing_files: bool = False
    base_models: dict[str, Path] = field(default_factory=dict)
    runs: dict[str, TrainingRun] = field(default_factory=dict)
    states: dict[str, TrainingState] = field(default_factory=dict)
    deleted: list[str] = field(default_factory=list)
    finished: dict[str, str] = field(default_factory=dict)
    _sessions: dict[str, int] = field(default_factory=dict)
    _futures: dict[str, Callable[[], Response]] = field(default_factory=dict)
    _signed_files: dict[str, SignedFile] = field(default_factory=dict)
    _server: uvicorn.Server | None = None
    _thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def url_requests(self) -> int:
        """How many times the signed URLs of a checkpoint were asked for."""
        return sum(request.endswith("/external_weights_urls") for request in self.requests)

    @property
    def file_requests(self) -> int:
        return sum(request.startswith("GET /files/") for request in self.requests)

    def add_checkpoint(self, checkpoint: StandinCheckpoint) -> StandinCheckpoint:
        self.checkpoints[checkpoint.tinker_path] = checkpoint
        return checkpoint

    def add_base_model(self, name: str, folder: Path) -> None:
        """Train runs of `name` on the transformers model in `folder`, and list it as a
        trainable model (once)."""
        self.base_models[name] = folder
        if not any(entry["model_name"] == name for entry in self.supported_models):
            self.supported_models.append(
                {"model_name": name, "max_context_length": 2048, "trainable": True, "sampleable": False}
            )

    def sessions_of(self, prefix: str) -> list[str]:
        return [session for session in self._sessions if session.startswith(prefix)]

    def revoke_signed_urls(self) -> None:
        """Every URL signed so far answers 403 from now on, whatever its `expires` said
        (a revoked signature, or the client's clock running behind)."""
        for signed in self._signed_files.values():
            signed.expires = datetime.now(UTC)

    def start(self) -> Self:
        config = uvicorn.Config(self._app(), host="127.0.0.1", port=self.port, log_level="warning", lifespan="off")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="tinker-standin", daemon=True)
        self._thread.start()
        server = self._server
        wait_until(lambda: server.started, 10, "the Tinker stand-in to listen")
        return self

    def stop(self) -> None:
        if self._server and self._thread:
            self._server.should_exit = True
            self._thread.join(10)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # --- the service ---------------------------------------------------------------------

    def _app(self) -> Starlette:
        routes = [
            Route("/api/v1/client/config", self._client_config, methods=["POST"]),
            Route("/api/v1/client/dynamic_config", self._client_dynamic_config, methods=["POST"]),
            Route("/api/v1/get_server_capabilities", self._server_capabilities, methods=["GET"]),
            Route("/api/v1/weights_info", self._weights_info, methods=["POST"]),
            Route(
                "/api/v1/training_runs/{run_id}/checkpoints/external_weights/{name}/external_weights_urls",
                self._external_weights_urls,
                methods=["GET"],
            ),
            Route("/files/{token}", self._signed_file, methods=["GET"]),
            Route("/api/v1/telemetry", self._telemetry, methods=["POST"]),
            Route("/api/v1/create_session", self._create_session, methods=["POST"]),
            Route("/api/v1/session_heartbeat", self._session_heartbeat, methods=["POST"]),
            Route("/api/v1/sessions/{session_id}/finish", self._finish_session, methods=["POST"]),
            Route("/api/v1/create_model", self._create_model, methods=["POST"]),
            Route("/api/v1/load_weights", self._load_weights, methods=["POST"]),
            Route("/api/v1/get_info", self._get_info, methods=["POST"]),
            Route("/api/v1/forward_backward", self._forward_backward, methods=["POST"]),
            Route("/api/v1/optim_step", self._optim_step, methods=["POST"]),
            Route("/api/v1/save_weights", self._save_weights, methods=["POST"]),
            Route("/api/v1/save_weights_external", self._save_weights_external, methods=["POST"]),
            Route("/api/v1/retrieve_future", self._retrieve_future, methods=["POST"]),
            Route(
                "/api/v1/training_runs/{run_id}/checkpoints/{kind}/{name}", self._delete_checkpoint, methods=["DELETE"]
            ),
            Route(
                "/api/v1/training_runs/{run_id}/checkpoints/{kind}/{name}/ttl", self._checkpoint_ttl, methods=["PUT"]
            ),
        ]
        app = Starlette(routes=routes)
        app.add_middleware(BaseHTTPMiddleware, dispatch=self._record_and_authenticate)
        return app

    async def _record_and_authenticate(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        self.requests.append(f"{request.method} {request.url.path}")
        # signed file URLs carry their own authorisation, like a storage bucket's
        if request.url.path.startswith("/api/") and request.headers.get("x-api-key") != self.api_key:
            return _error(403, "invalid API key")
        return await call_next(request)

    async def _client_config(self, request: Request) -> Response:
        # plain API keys (no JWT exchange), and httpx's own transport
        return JSONResponse({"pjwt_auth_enabled": False, "use_pyqwest_transport": False})

    async def _client_dynamic_config(self, request: Request) -> Response:
        return JSONResponse({})

    async def _server_capabilities(self, request: Request) -> Response:
        return JSONResponse({"supported_models": self.supported_models})

    async def _weights_info(self, request: Request) -> Response:
        body = await request.json()
        checkpoint = self.checkpoints.get(body.get("tinker_path", ""))
        if checkpoint is None:
            return _error(404, f"checkpoint {body.get('tinker_path')!r} not found")
        return JSONResponse(
            {
                "base_model": checkpoint.base_model,
                "is_lora": True,
                "lora_rank": checkpoint.lora_rank,
                "train_unembed": checkpoint.train_unembed,
                "train_mlp": checkpoint.train_mlp,
                "train_attn": checkpoint.train_attn,
            }
        )

    async def _external_weights_urls(self, request: Request) -> Response:
        path = f"tinker://{request.path_params['run_id']}/external_weights/{request.path_params['name']}"
        checkpoint = self.checkpoints.get(path)
        if checkpoint is None:
            return _error(404, f"checkpoint {path!r} not found")
        expires = datetime.now(UTC) + self.url_lifetime
        urls = {name: self._sign(content, expires) for name, content in checkpoint.files.items()}
        shown_expiry = expires.replace(tzinfo=None) if self.naive_expires else expires
        return JSONResponse({"urls": urls, "expires": shown_expiry.isoformat()})

    def _sign(self, content: bytes, expires: datetime) -> str:
        token = secrets.token_urlsafe(16)
        self._signed_files[token] = SignedFile(content, expires)
        return f"{self.base_url}/files/{token}"

    async def _signed_file(self, request: Request) -> Response:
        signed = self._signed_files.get(request.path_params["token"])
        if signed is None:
            return _error(404, "no such object")
        if datetime.now(UTC) >= signed.expires:
            return _error(403, "signed URL expired")
        if self.failing_files:
            return _error(404, "the object is gone")
        return Response(signed.content, media_type="application/octet-stream")

    # --- sessions ------------------------------------------------------------------------

    async def _telemetry(self, request: Request) -> Response:
        return JSONResponse({"status": "accepted"})

    async def _create_session(self, request: Request) -> Response:
        session_id = f"sess-{secrets.token_hex(6)}"
        self._sessions[session_id] = 0
        return JSONResponse({"type": "create_session", "session_id": session_id})

    async def _session_heartbeat(self, request: Request) -> Response:
        return JSONResponse({"type": "session_heartbeat"})

    async def _finish_session(self, request: Request) -> Response:
        body = await request.json()
        self.finished[request.path_params["session_id"]] = body.get("reason", {}).get("type", "")
        return JSONResponse({})

    # --- training ------------------------------------------------------------------------

    def _future(self, answer: Callable[[], Response]) -> Response:
        request_id = secrets.token_hex(8)
        self._futures[request_id] = answer
        return JSONResponse({"request_id": request_id})

    def _result(self, payload: dict[str, Any]) -> Response:
        return self._future(lambda: JSONResponse(payload))

    async def _retrieve_future(self, request: Request) -> Response:
        body = await request.json()
        answer = self._futures.get(body.get("request_id", ""))
        if answer is None:
            return _error(404, f"no request {body.get('request_id')!r}")
        return answer()

    async def _create_model(self, request: Request) -> Response:
        body = await request.json()
        base_model = body["base_model"]
        trainable = {entry["model_name"] for entry in self.supported_models if entry.get("trainable")}
        if base_model not in self.base_models or base_model not in trainable:
            return _error(404, f"base model {base_model!r} is not supported for training")
        lora = body.get("lora_config") or {}
        state = TrainingState(
            base_model=base_model,
            rank=int(lora.get("rank", 32)),
            train_attn=lora.get("train_attn", True),
            train_mlp=lora.get("train_mlp", True),
            train_unembed=lora.get("train_unembed", True),
            tensors={},
            optimizer=None,
        )
        model_id = f"{body['session_id']}:train:{body['model_seq_id']}"
        run = await run_in_threadpool(self._build_run, model_id, state, lora.get("seed"))
        self.runs[model_id] = run
        return self._result({"model_id": model_id, "type": "create_model"})

    async def _load_weights(self, request: Request) -> Response:
        body = await request.json()
        state = self.states.get(body["path"])
        if state is None:
            return _error(404, f"checkpoint {body['path']!r} not found")
        model_id = f"{body['session_id']}:train:{body['model_seq_id']}"
        run = await run_in_threadpool(self._build_run, model_id, state, None, body.get("optimizer", False))
        self.runs[model_id] = run
        return self._result({"path": body["path"], "model_id": model_id, "type": "load_weights"})

    def _build_run(
        self, model_id: str, state: TrainingState, seed: int | None, with_optimizer: bool = False
    ) -> TrainingRun:
        import torch
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        torch.manual_seed(seed or 0)
        base = AutoModelForCausalLM.from_pretrained(self.base_models[state.base_model], dtype=torch.float32)
        targets = [*(ATTENTION if state.train_attn else ()), *(MLP if state.train_mlp else ())]
        targets += ["lm_head"] if state.train_unembed else []
        config = LoraConfig(r=state.rank, lora_alpha=LORA_ALPHA, target_modules=targets, lora_dropout=0.0)
        run = TrainingRun(
            model_id,
            state.base_model,
            state.rank,
            get_peft_model(base, config),
            (state.train_attn, state.train_mlp, state.train_unembed),
        )
        if state.tensors:
            with torch.no_grad():
                for name, parameter in run.trainable().items():
                    parameter.copy_(state.tensors[name])
        if with_optimizer and state.optimizer is not None:
            run.optimizer = torch.optim.AdamW(list(run.trainable().values()))
            run.optimizer.load_state_dict(copy.deepcopy(state.optimizer))
        return run

    def _run(self, model_id: str) -> TrainingRun | None:
        return self.runs.get(model_id)

    async def _get_info(self, request: Request) -> Response:
        body = await request.json()
        run = self._run(body["model_id"])
        if run is None:
            return _error(404, f"no model {body['model_id']!r}")
        # the tokenizer is the local base's: the SDK's get_tokenizer() then needs no Hub
        tokenizer = str(self.base_models[run.base_model])
        return JSONResponse(
            {
                "type": "get_info",
                "model_data": {"arch": "llama", "model_name": run.base_model, "tokenizer_id": tokenizer},
                "model_id": run.model_id,
                "is_lora": True,
                "lora_rank": run.rank,
                "model_name": run.base_model,
            }
        )

    async def _forward_backward(self, request: Request) -> Response:
        from tinker.proto import tinker_public_pb2 as pb

        message = pb.ForwardBackwardRequest()
        message.ParseFromString(await request.body())
        run = self._run(message.model_id)
        if run is None:
            return _error(404, f"no model {message.model_id!r}")
        output = await run_in_threadpool(_forward_backward, run, message)
        return self._future(lambda: Response(output, media_type="application/x-protobuf"))

    async def _optim_step(self, request: Request) -> Response:
        body = await request.json()
        run = self._run(body["model_id"])
        if run is None:
            return _error(404, f"no model {body['model_id']!r}")
        await run_in_threadpool(_optim_step, run, body["adam_params"])
        return self._result({"metrics": {}})

    async def _save_weights(self, request: Request) -> Response:
        body = await request.json()
        run = self._run(body["model_id"])
        if run is None:
            return _error(404, f"no model {body['model_id']!r}")
        path = f"tinker://{run.model_id}/weights/{body['path']}"
        with run.lock:
            attn, mlp, unembed = run.lora_targets
            self.states[path] = TrainingState(
                base_model=run.base_model,
                rank=run.rank,
                train_attn=attn,
                train_mlp=mlp,
                train_unembed=unembed,
                tensors={name: parameter.detach().clone() for name, parameter in run.trainable().items()},
                optimizer=copy.deepcopy(run.optimizer.state_dict()) if run.optimizer is not None else None,
            )
        self.add_checkpoint(
            StandinCheckpoint(
                run_id=run.model_id,
                name=body["path"],
                base_model=run.base_model,
                files={},
                kind="weights",
                lora_rank=run.rank,
                train_attn=attn,
                train_mlp=mlp,
                train_unembed=unembed,
            )
        )
        return self._result({"path": path, "type": "save_weights"})

    async def _save_weights_external(self, request: Request) -> Response:
        body = await request.json()
        run = self._run(body["model_id"])
        if run is None:
            return _error(404, f"no model {body['model_id']!r}")
        ttl = body.get("ttl_seconds")
        if ttl is not None and ttl < 3600:
            return self._result({"error": "ttl_seconds must be at least 3600", "category": "user"})
        files = await run_in_threadpool(_export, run)
        attn, mlp, unembed = run.lora_targets
        checkpoint = self.add_checkpoint(
            StandinCheckpoint(
                run_id=run.model_id,
                name=body["path"],
                base_model=run.base_model,
                files=files,
                lora_rank=run.rank,
                train_attn=attn,
                train_mlp=mlp,
                train_unembed=unembed,
            )
        )
        size = sum(map(len, files.values()))
        return self._result({"path": checkpoint.tinker_path, "size_bytes": size, "type": "save_weights_external"})

    async def _delete_checkpoint(self, request: Request) -> Response:
        params = request.path_params
        path = f"tinker://{params['run_id']}/{params['kind']}/{params['name']}"
        if self.checkpoints.pop(path, None) is None:
            return _error(404, f"checkpoint {path!r} not found")
        self.states.pop(path, None)
        self.deleted.append(path)
        return Response(status_code=204)

    async def _checkpoint_ttl(self, request: Request) -> Response:
        params = request.path_params
        path = f"tinker://{params['run_id']}/{params['kind']}/{params['name']}"
        if path not in self.checkpoints:
            return _error(404, f"checkpoint {path!r} not found")
        return JSONResponse({})


def _forward_backward(run: TrainingRun, message: Any) -> bytes:
    """Cross-entropy of each datum's target tokens, weighted, summed; with a backward pass
    (gradients accumulate until the next optim_step) unless `forward_only`."""
    import numpy as np
    import torch
    from tinker.proto import tinker_public_pb2 as pb

    total = 0.0
    logprobs_of: list[Any] = []
    with run.lock:
        run.model.train(not message.forward_only)
        for datum in message.data:
            tokens = np.concatenate(
                [np.frombuffer(chunk.encoded_text.tokens, dtype=np.int32) for chunk in datum.model_input]
            ).astype(np.int64)
            targets = torch.from_numpy(np.frombuffer(datum.loss_fn_inputs["target_tokens"].dense, np.int64).copy())
            weights = torch.from_numpy(np.frombuffer(datum.loss_fn_inputs["weights"].dense, np.float32).copy())
            with torch.set_grad_enabled(not message.forward_only):
                logits = run.model(input_ids=torch.from_numpy(tokens)[None]).logits[0].float()
                logprobs = torch.log_softmax(logits, -1).gather(-1, targets[:, None])[:, 0]
                loss = -(logprobs * weights).sum()
                if not message.forward_only:
                    loss.backward()
            total += float(loss.detach())
            logprobs_of.append(logprobs.detach().numpy().astype(np.float32))
        if message.forward_only:
            run.forward_calls += 1
        else:
            run.forward_backward_calls += 1
    output = pb.ForwardBackwardOutput(loss_fn_output_type="ArrayRecord")
    record = output.loss_fn_outputs.add()
    record.type_tag = "ArrayRecord"
    record.num_datums = len(logprobs_of)
    field = record.fields["logprobs"]
    field.dtype = pb.DTYPE_FLOAT32
    field.data = b"".join(array.tobytes() for array in logprobs_of)
    field.offsets = np.cumsum([0] + [array.nbytes for array in logprobs_of]).astype(np.int64).tobytes()
    output.metrics["loss:sum"] = total
    return output.SerializeToString()


def _optim_step(run: TrainingRun, adam: dict[str, Any]) -> None:
    import torch

    with run.lock:
        parameters = list(run.trainable().values())
        if run.optimizer is None:
            run.optimizer = torch.optim.AdamW(parameters)
        for group in run.optimizer.param_groups:
            group.update(
                lr=adam["learning_rate"],
                betas=(adam["beta1"], adam["beta2"]),
                eps=adam["eps"],
                weight_decay=adam["weight_decay"],
            )
        if adam.get("grad_clip_norm"):
            torch.nn.utils.clip_grad_norm_(parameters, adam["grad_clip_norm"])
        run.optimizer.step()
        run.optimizer.zero_grad()
        run.learning_rates.append(adam["learning_rate"])


def _export(run: TrainingRun) -> dict[str, bytes]:
    """The LoRA tensors only, as Tinker exports them: `base_model.model.<module>.lora_A.weight`
    (PEFT's adapter name dropped), the unembedding as `model.unembed_tokens`, and an
    `adapter_config.json` of just `r` and `lora_alpha`."""
    from safetensors.torch import save_file

    tensors = {}
    with run.lock:
        for name, parameter in run.trainable().items():
            exported = name.replace(".default.", ".").replace(
                "base_model.model.lm_head.", "base_model.model.model.unembed_tokens."
            )
            tensors[exported] = parameter.detach().clone().contiguous()
    with tempfile.TemporaryDirectory() as folder:
        save_file(tensors, f"{folder}/adapter_model.safetensors")
        weights = Path(folder, "adapter_model.safetensors").read_bytes()
    config = json.dumps({"r": run.rank, "lora_alpha": LORA_ALPHA}).encode()
    return {"adapter_config.json": config, "adapter_model.safetensors": weights}


def _error(status: int, detail: str) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status)
