"""How `confprobe` prints answers as text: aligned tables with one column list per kind of
resource, so the ids come first and a shell can `awk` them."""

from collections.abc import Callable, Sequence
from typing import Any

from confprobe_client.types import Estimate

Column = tuple[str, Callable[[Any], str]]


def aligned_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Columns padded to their widest cell, trailing blanks cut, for eyes and `awk` alike."""
    widths = [max(len(text) for text in column) for column in zip(headers, *rows, strict=True)]
    return "\n".join(
        "  ".join(text.ljust(width) for text, width in zip(row, widths, strict=True)).rstrip()
        for row in [headers, *rows]
    )


def metric(metrics: dict[str, Estimate], name: str) -> str:
    """An estimate to three decimals; "-" where the service could not compute it."""
    estimate = metrics.get(name)
    return "-" if estimate is None or estimate.value is None else f"{estimate.value:.3f}"


def interval(bounds: list[float] | None) -> str:
    """A 95% interval as [low, high]; "-" where there is none."""
    return f"[{bounds[0]:.3f}, {bounds[1]:.3f}]" if bounds else "-"


def loss(value: float | None) -> str:
    """A loss to three decimals; "-" until there is one."""
    return "-" if value is None else f"{value:.3f}"


MODEL_COLUMNS: list[Column] = [
    ("ID", lambda m: m.id),
    ("NAME", lambda m: m.name),
    ("ARCHITECTURE", lambda m: m.architecture),
    ("LAYERS", lambda m: str(m.num_layers)),
    ("HIDDEN", lambda m: str(m.hidden_size)),
    ("DTYPE", lambda m: m.dtype + (f"/{m.quantization}" if m.quantization else "")),
    ("STATUS", lambda m: m.status),
]
DATASET_COLUMNS: list[Column] = [
    ("ID", lambda d: d.id),
    ("NAME", lambda d: d.name),
    ("KIND", lambda d: d.kind),
    ("ROWS", lambda d: str(d.rows)),
    ("LABELS", lambda d: " ".join(f"{label}:{count}" for label, count in sorted(d.label_balance.items()))),
]
ADAPTER_COLUMNS: list[Column] = [
    ("ID", lambda a: a.id),
    ("NAME", lambda a: a.name),
    ("BASE MODEL", lambda a: a.base_model_id),
    ("R", lambda a: str(a.r)),
    ("ALPHA", lambda a: f"{a.lora_alpha:g}"),
    ("SOURCE", lambda a: a.source_kind),
]
JOB_COLUMNS: list[Column] = [
    ("ID", lambda j: j.id),
    ("KIND", lambda j: j.kind),
    ("STATUS", lambda j: j.status),
    ("STAGE", lambda j: j.progress.stage or "-"),
    ("PROGRESS", lambda j: f"{j.progress.done}/{j.progress.total}" if j.progress.total else str(j.progress.done)),
    ("ERROR", lambda j: j.error.code if j.error else "-"),
]


def prompt_format_label(prompt_format: str) -> str:
    """`raw`, `chat`, or `template` for a template (whole, it would not fit a column)."""
    return prompt_format if prompt_format in ("raw", "chat") else "template"


EXTRACTION_COLUMNS: list[Column] = [
    ("ID", lambda e: e.id),
    ("JOB", lambda e: e.job_id),
    ("STATUS", lambda e: e.status),
    ("LAYERS", lambda e: ",".join(map(str, e.layers))),
    ("SHAPE", lambda e: "x".join(map(str, e.shape)) if e.shape else "-"),
    ("PROMPT", lambda e: prompt_format_label(e.prompt_format)),
]
PROBE_COLUMNS: list[Column] = [
    ("ID", lambda p: p.id),
    ("LAYER", lambda p: str(p.layer)),
    ("METHOD", lambda p: p.method),
    ("BEST", lambda p: "*" if p.is_best else ""),
    ("AUROC", lambda p: metric(p.metrics, "auroc")),
    ("ECE", lambda p: metric(p.metrics, "ece")),
    ("BRIER", lambda p: metric(p.metrics, "brier")),
]
EVALUATION_COLUMNS: list[Column] = [
    ("ID", lambda e: e.id),
    ("PROBE", lambda e: e.probe_id),
    ("DATASET", lambda e: e.dataset_id),
    ("VARIANT", lambda e: e.adapter_id or "base"),
    ("ROWS", lambda e: e.rows),
    ("N", lambda e: "" if e.n is None else str(e.n)),
    ("STATUS", lambda e: e.status),
    ("AUROC", lambda e: metric(e.metrics or {}, "auroc")),
    ("ECE", lambda e: metric(e.metrics or {}, "ece")),
    ("BRIER", lambda e: metric(e.metrics or {}, "brier")),
]
RUN_COLUMNS: list[Column] = [
    ("RUN", lambda r: r.id),
    ("JOB", lambda r: r.job_id),
    ("STATUS", lambda r: r.status),
    ("LAYERS", lambda r: ",".join(map(str, r.layers))),
    ("METHODS", lambda r: ",".join(r.methods)),
    ("PROMPT", lambda r: prompt_format_label(r.prompt_format)),
]
KEY_COLUMNS: list[Column] = [
    ("ID", lambda k: k.id),
    ("NAME", lambda k: k.name),
    ("PREFIX", lambda k: k.prefix),
    ("SCOPES", lambda k: ",".join(k.scopes)),
    ("RATE/MIN", lambda k: "default" if k.rate_limit_per_minute is None else str(k.rate_limit_per_minute)),
    ("LAST USED", lambda k: k.last_used_at.isoformat(timespec="minutes") if k.last_used_at else "-"),
    ("REVOKED", lambda k: k.revoked_at.isoformat(timespec="minutes") if k.revoked_at else "-"),
]
COMPARISON_COLUMNS: list[Column] = [
    ("ID", lambda c: c.id),
    ("JOB", lambda c: c.job_id),
    ("STATUS", lambda c: c.status),
    ("ADAPTERS", lambda c: ",".join(c.adapter_ids)),
    ("LAYER", lambda c: str(c.report.layer) if c.report else "-"),
]
FINETUNE_COLUMNS: list[Column] = [
    ("ID", lambda f: f.id),
    ("NAME", lambda f: f.name),
    ("STATUS", lambda f: f.status),
    ("ADAPTER", lambda f: f.adapter_id or "-"),
    ("LOSS", lambda f: loss(f.final_loss)),
    ("VAL LOSS", lambda f: loss(f.final_validation_loss)),
    ("BEST VAL", lambda f: loss(f.best_validation_loss)),
]
LOSS_POINT_COLUMNS: list[Column] = [
    ("STEP", lambda p: str(p.step)),
    ("LOSS", lambda p: loss(p.loss)),
    ("LR", lambda p: f"{p.learning_rate:.2e}"),
    ("TOKENS", lambda p: str(p.tokens)),
    ("VAL LOSS", lambda p: loss(p.validation_loss)),
]
