"""Training on Tinker through the `tinker` SDK: a session, a LoRA training run on one of the
service's base models, one `forward_backward` + `optim_step` per step, training-state
checkpoints (`save_state`) a later session resumes from, and the trained adapter exported
(`save_weights_external`), downloaded and its export deleted.

The service tokenizes: each example travels as token ids (`ModelInput.from_ints`), built by
the registered model's own tokenizer exactly as the local backend builds them, so Tinker's
tokenizer (which the SDK would fetch from the Hugging Face Hub) is never needed.

Exporting is also how a `weights` checkpoint (training state, which the SDK cannot download)
is imported, the way the SDK's `tinker checkpoint download` does it: a session loads the
state, exports it with a TTL, the export is downloaded and then deleted, also when the
download fails (the TTL removes it otherwise).

Every SDK call waits at most a deadline (a step: `STEP_TIMEOUT_S`, the rest: the adapter's
`SDK_TIMEOUT_S`); a failure or a deadline passed becomes a `JobFailed`.
"""

import logging
import secrets
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tinker

from workers.adapters.tinker import SDK_TIMEOUT_S, TinkerClient, TinkerPath, in_thread, parse_tinker_path, wait
from workers.finetuning import Example

log = logging.getLogger(__name__)

# a step on a large model can queue on Tinker for minutes
STEP_TIMEOUT_S = 900.0
# the shortest TTL Tinker accepts: an export that is never deleted goes by itself
EXPORT_TTL_S = 3600
LOSS = "cross_entropy"
LOSS_SUM = "loss:sum"


def datum(example: Example) -> tinker.Datum:
    """The example as Tinker's cross-entropy reads it: the model sees every token but the
    last, and position i is scored on token i + 1, with weight 1 where that token is a
    completion target and 0 elsewhere."""
    tokens = list(example.token_ids)
    targets = set(example.targets)
    weights = [1.0 if position in targets else 0.0 for position in range(1, len(tokens))]
    return tinker.Datum(
        model_input=tinker.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={
            "target_tokens": tinker.TensorData(data=tokens[1:], dtype="int64", shape=[len(tokens) - 1]),
            "weights": tinker.TensorData(data=weights, dtype="float32", shape=[len(weights)]),
        },
    )


@dataclass(frozen=True)
class AdamSettings:
    """AdamW as the local backend runs it (torch's defaults), at one step's rate."""

    learning_rate: float
    weight_decay: float = 0.0
    grad_clip_norm: float | None = None

    def params(self) -> tinker.AdamParams:
        return tinker.AdamParams(
            learning_rate=self.learning_rate,
            beta1=0.9,
            beta2=0.999,
            eps=1e-8,
            weight_decay=self.weight_decay,
            grad_clip_norm=self.grad_clip_norm or 0.0,  # 0: no clipping
        )


class TinkerRun:
    """One LoRA training run of a session: its steps, losses, checkpoints and export."""

    def __init__(self, client: TinkerClient, training: Any) -> None:
        self._client = client
        self._training = training
        self.model_id: str = training.model_id

    def step(self, examples: Sequence[Example], adam: AdamSettings) -> float:
        """One update over `examples`; returns the summed loss over their completion tokens
        (before the update). The optimizer step is submitted before the loss is waited for,
        as the SDK recommends: Tinker runs a run's requests in order."""
        with self._client.failures_as_job_failed(f"training step of {self.model_id}"):
            losses = self._training.forward_backward([datum(example) for example in examples], LOSS)
            update = self._training.optim_step(adam.params())
            output = wait(losses, STEP_TIMEOUT_S)
            wait(update, STEP_TIMEOUT_S)
        return float(output.metrics[LOSS_SUM])

    def loss(self, examples: Sequence[Example]) -> float:
        """The summed loss over the completion tokens of `examples`, with no backward pass."""
        with self._client.failures_as_job_failed(f"validation loss of {self.model_id}"):
            output = wait(self._training.forward([datum(example) for example in examples], LOSS), STEP_TIMEOUT_S)
        return float(output.metrics[LOSS_SUM])

    def save_state(self, name: str) -> str:
        """A training-state checkpoint (weights and optimizer) that a session resumes from."""
        with self._client.failures_as_job_failed(f"checkpoint {name} of {self.model_id}"):
            return str(wait(self._training.save_state(name), STEP_TIMEOUT_S).path)

    def export(
        self, destination: Path, max_bytes: int, on_file: Callable[[int, int], None] | None = None
    ) -> tuple[TinkerPath, list[Path]]:
        """The adapter's files in `destination`, through a temporary export that is deleted
        afterwards whether or not the download worked."""
        name = f"confprobe-{secrets.token_hex(6)}"
        with self._client.failures_as_job_failed(f"exporting the weights of {self.model_id}"):
            saved = wait(self._training.save_weights_external(name, ttl_seconds=EXPORT_TTL_S), STEP_TIMEOUT_S)
        exported = parse_tinker_path(saved.path)
        try:
            return exported, self._client.download_external_weights(exported, destination, max_bytes, on_file)
        finally:
            self._delete(exported)

    def _delete(self, exported: TinkerPath) -> None:
        try:
            self._client.delete_checkpoint(exported)
        except Exception as error:  # never hides the download's own failure; the TTL removes it
            log.warning("could not delete the temporary export %s (its TTL removes it): %s", exported, error)


class TinkerSession:
    """A Tinker session (the SDK's `ServiceClient`), finished when the block ends: `success`,
    `interrupted` for a cancel, `errored` otherwise."""

    def __init__(self, client: TinkerClient) -> None:
        self._client = client
        self._service = tinker.ServiceClient(base_url=client.base_url, api_key=client.api_key)

    def create_lora(
        self, base_model: str, rank: int, seed: int, train_attn: bool, train_mlp: bool, train_unembed: bool
    ) -> TinkerRun:
        def create() -> Any:
            return wait(
                self._service.create_lora_training_client(
                    base_model=base_model,
                    rank=rank,
                    seed=seed,
                    train_attn=train_attn,
                    train_mlp=train_mlp,
                    train_unembed=train_unembed,
                ),
                SDK_TIMEOUT_S,
            )

        with self._client.failures_as_job_failed(f"creating a LoRA training run of {base_model}"):
            return TinkerRun(self._client, in_thread(create, SDK_TIMEOUT_S * 2))

    def from_state(self, path: str, with_optimizer: bool) -> TinkerRun:
        """A new run holding the checkpoint's weights (and AdamW's state, `with_optimizer`)."""
        load = (
            self._service.create_training_client_from_state_with_optimizer
            if with_optimizer
            else self._service.create_training_client_from_state
        )
        with self._client.failures_as_job_failed(path):
            return TinkerRun(self._client, in_thread(lambda: wait(load(path), SDK_TIMEOUT_S), SDK_TIMEOUT_S * 2))

    def close(self, status: str) -> None:
        try:
            wait(self._service.close(status), SDK_TIMEOUT_S)  # type: ignore[arg-type]
        except Exception as error:  # the session ends on Tinker's side when its heartbeats stop
            log.warning("could not finish the Tinker session: %s", error)


@contextmanager
def tinker_session(client: TinkerClient) -> Iterator[TinkerSession]:
    from workers.errors import JobCancelled

    session = TinkerSession(client)
    status = "errored"
    try:
        yield session
        status = "success"
    except JobCancelled:
        status = "interrupted"
        raise
    finally:
        session.close(status)


def download_training_state(
    client: TinkerClient, path: TinkerPath, destination: Path, max_bytes: int, on_file: Callable[[int, int], None]
) -> list[Path]:
    """A `weights` checkpoint's adapter files, as `tinker checkpoint download` gets them."""
    with tinker_session(client) as session:
        _, files = session.from_state(str(path), with_optimizer=False).export(destination, max_bytes, on_file)
    return files
