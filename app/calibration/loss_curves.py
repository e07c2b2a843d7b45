"""A fine-tune's loss curve: the training loss of every step and the validation loss where it
was computed, against the step, as SVG, PNG and a self-contained HTML page.

`points` are the JSON-ready dicts of a fine-tune's loss history (`step`, `loss`,
`learning_rate`, `tokens`, `validation_loss` or absent). matplotlib is imported only inside
the functions that draw, as for the calibration reports.
"""

from __future__ import annotations

import html
import io
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from app.calibration.rendering import PAGE_STYLE, inline_svg

if TYPE_CHECKING:
    from matplotlib.figure import Figure

Points = Sequence[Mapping[str, Any]]
FIGURE_INCHES = (10.0, 5.0)
PAGE_EXTRA = "#loss-curve svg { width: 100%; height: auto; } #facts td { text-align: left; white-space: normal; }\n"


def loss_figure(title: str, points: Points) -> Figure:
    """Training loss per step (thin line), validation loss where computed (markers), and the
    learning rate on a second axis (dotted)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=FIGURE_INCHES, layout="constrained")
    axes = figure.subplots()
    steps = [point["step"] for point in points]
    axes.plot(steps, [point["loss"] for point in points], color="#1f77b4", linewidth=1.2, label="training loss")
    validated = [point for point in points if point.get("validation_loss") is not None]
    if validated:
        axes.plot(
            [point["step"] for point in validated],
            [point["validation_loss"] for point in validated],
            color="#d62728",
            marker="o",
            linewidth=1.5,
            gid="validation-loss",
            label="validation loss",
        )
    axes.set_xlabel("step")
    axes.set_ylabel("mean cross-entropy over completion tokens (nats)")
    axes.set_title(title, fontsize=11)
    axes.grid(True, alpha=0.3)
    rate = axes.twinx()
    rate.plot(
        steps, [point["learning_rate"] for point in points], color="#7f7f7f", linestyle=":", label="learning rate"
    )
    rate.set_ylabel("learning rate")
    handles = axes.get_legend_handles_labels()[0] + rate.get_legend_handles_labels()[0]
    figure.legend(handles=handles, loc="outside lower center", ncols=3, frameon=False, fontsize=10)
    return figure


def render_loss_svg(title: str, points: Points) -> str:
    """The same points always give the same bytes (no date, fixed element ids)."""
    import matplotlib

    buffer = io.BytesIO()
    with matplotlib.rc_context({"svg.hashsalt": "confprobe"}):
        loss_figure(title, points).savefig(buffer, format="svg", metadata={"Date": None})
    return buffer.getvalue().decode("utf-8")


def render_loss_png(title: str, points: Points, dpi: int = 100) -> bytes:
    buffer = io.BytesIO()
    loss_figure(title, points).savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def render_loss_html(title: str, points: Points, facts: Sequence[tuple[str, str]]) -> str:
    """The curve and a table of what the run was (settings, losses); strings escaped."""
    rows = "".join(
        f'<tr><th scope="row">{html.escape(name)}</th><td>{html.escape(value)}</td></tr>' for name, value in facts
    )
    return (
        "<!DOCTYPE html>\n"
        f'<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{PAGE_STYLE}{PAGE_EXTRA}</style></head><body>\n"
        f"<h1>{html.escape(title)}</h1>\n"
        f'<figure id="loss-curve">{inline_svg(render_loss_svg(title, points))}</figure>\n'
        f'<table id="facts"><tbody>{rows}</tbody></table>\n'
        "</body></html>\n"
    )
