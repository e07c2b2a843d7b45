"""A local stand-in of the Tinker REST service, for tests of the worker's Tinker client.

It answers exactly what the `tinker` SDK 0.38 sends for the calls the worker makes: the
client configuration fetched when a `RestClient` is built, weights info, server
capabilities, and the signed URLs of an external weights checkpoint; and it serves the
checkpoint's files at those URLs until they expire (403 after). API requests must carry the
right `X-API-Key`.

Every error is a 403 or 404 with a JSON body: the SDK retries 408, 409, 429, 5xx and a 400
without a body for up to 300 s, so the stand-in never answers those.
"""

import secrets
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Self

import uvicorn
from starlette.applications import Starlette
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


@dataclass
class TinkerStandin:
    """The stand-in on a free loopback port, served by uvicorn in a background thread.

    Tests set `url_lifetime` (how long signed URLs stay valid), `naive_expires` (send
    `expires` without a timezone), `supported_models`, call `revoke_signed_urls()`, and read
    `requests` ("METHOD path" of every request received), `url_requests` or `file_requests`.
    """

    api_key: str = "tml-test-key"
    port: int = field(default_factory=free_port)
    url_lifetime: timedelta = timedelta(hours=1)
    naive_expires: bool = False
    supported_models: list[dict[str, Any]] = field(default_factory=lambda: list(DEFAULT_MODELS))
    checkpoints: dict[str, StandinCheckpoint] = field(default_factory=dict)
    requests: list[str] = field(default_factory=list)
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
        return Response(signed.content, media_type="application/octet-stream")


def _error(status: int, detail: str) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status)
