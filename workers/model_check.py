"""The `model_check` job: load a registered model, run one token through it, and confirm
what its config promised (layer count, hidden size)."""

from typing import TYPE_CHECKING, Any

from sqlalchemy import update

from app.job_kinds import ModelCheckParameters
from app.registry.tables import Model
from workers.context import subject_row
from workers.errors import AttemptSuperseded, JobCancelled, JobFailed
from workers.hidden_states import block_linear_names
from workers.model_loading import active_adapter, explained_quantization_errors

if TYPE_CHECKING:
    from workers.context import JobContext


def _one_token_hidden_states(model: Any, token_id: int, device: str) -> tuple[int, int]:
    """(number of blocks, hidden size) as the model itself reports them."""
    import torch

    with torch.inference_mode():
        output = model(input_ids=torch.tensor([[token_id]], device=device), output_hidden_states=True)
    hidden_states = output.hidden_states
    return len(hidden_states) - 1, int(hidden_states[-1].shape[-1])


def run(context: "JobContext[ModelCheckParameters]") -> dict[str, Any]:
    model_id = context.params.model_id
    sessions = context.runtime.sessions
    with sessions() as session:
        row = subject_row(session, Model, model_id, "model")
    try:
        context.progress("loading", 0, 2)
        loaded = context.runtime.models.get(row)
        context.progress("forward", 1, 2)
        tokenizer = loaded.tokenizer
        token_id = next(
            (t for t in (tokenizer.bos_token_id, tokenizer.cls_token_id, tokenizer.eos_token_id) if t is not None), 0
        )
        device = context.runtime.models.device
        with explained_quantization_errors(row.quantization, device), active_adapter(loaded, None):
            num_layers, hidden_size = _one_token_hidden_states(loaded.model, token_id, device)
        if (num_layers, hidden_size) != (row.num_layers, row.hidden_size):
            raise JobFailed(
                "shape_mismatch",
                f"the loaded model has {num_layers} layers of width {hidden_size}; config.json says {row.num_layers} of {row.hidden_size}",
                num_layers=num_layers,
                hidden_size=hidden_size,
            )
    except AttemptSuperseded:
        raise  # the model is another attempt's to judge now
    except BaseException as exc:
        if isinstance(exc, JobFailed):
            reason = exc.message
        elif isinstance(exc, JobCancelled):
            reason = "the check was cancelled before it finished"
        else:
            reason = f"{type(exc).__name__}: {exc}"
        with sessions() as session, session.begin():
            session.execute(update(Model).where(Model.id == model_id).values(status="failed", status_reason=reason))
        raise
    linear_modules = block_linear_names(loaded.model)
    with sessions() as session, session.begin():
        session.execute(
            update(Model)
            .where(Model.id == model_id)
            .values(
                status="ready",
                status_reason=None,
                parameter_count=loaded.parameter_count,
                memory_footprint_bytes=loaded.footprint_bytes,
                has_chat_template=bool(getattr(tokenizer, "chat_template", None)),
                linear_modules=linear_modules,
            )
        )
    context.progress("done", 2, 2)
    return {
        "model_id": model_id,
        "num_layers": num_layers,
        "hidden_size": hidden_size,
        "parameter_count": loaded.parameter_count,
        "memory_footprint_bytes": loaded.footprint_bytes,
        "resident_loads": context.runtime.models.loads,
    }
