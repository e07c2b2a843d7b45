"""Layer sweeps drawn: AUROC and ECE against the layer, one curve per probe method (a probe
run) or per model (a comparison), each point with its interval as a band — the figure every
probing paper has.

`curves` maps a curve's label to `{layer: {"auroc": estimate, "ece": estimate}}`, each
estimate a report metric's JSON (`value`, `interval`); a missing value leaves a gap.
matplotlib is imported only inside the functions that draw.
"""

from __future__ import annotations

import html
import io
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from app.calibration.rendering import MISSING, PAGE_STYLE, format_estimate, inline_svg

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

Curves = Mapping[str, Mapping[int, Mapping[str, Mapping[str, Any] | None]]]
PANELS = (("auroc", "AUROC (test split)"), ("ece", "ECE (test split)"))
PAGE_EXTRA = "#layer-sweep svg { width: 100%; height: auto; } h2 { font-size: 1.15rem; margin-top: 2rem; }\n"


def sweep_figure(curves: Curves, title: str, chosen: Mapping[str, int] | None = None) -> Figure:
    """Left AUROC, right ECE, against the layer; a band per curve for its intervals, a ring
    on the layer chosen on validation (`chosen`: curve label → layer), chance at 0.5."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(12.0, 4.8), layout="constrained")
    panels = figure.subplots(1, 2)
    for axes, (name, ylabel) in zip(panels, PANELS, strict=True):
        for index, (label, by_layer) in enumerate(curves.items()):
            _draw_curve(axes, index, label, by_layer, name, (chosen or {}).get(label))
        axes.set_xlabel("layer (0: embeddings; i: output of block i)")
        axes.set_ylabel(ylabel)
        axes.grid(True, alpha=0.3)
    panels[0].axhline(0.5, color="#888888", linestyle="--", linewidth=1, label="chance")
    panels[0].set_ylim(0.0, 1.02)
    panels[1].set_ylim(bottom=0.0)
    figure.suptitle(title, fontsize=11)
    handles, labels = panels[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 4), frameon=False, fontsize=10)
    return figure


def _draw_curve(
    axes: Axes,
    index: int,
    label: str,
    by_layer: Mapping[int, Mapping[str, Mapping[str, Any] | None]],
    name: str,
    chosen: int | None,
) -> None:
    colour = f"C{index % 10}"
    layers = sorted(by_layer)
    estimates = [by_layer[layer].get(name) or {} for layer in layers]
    values = [estimate.get("value") for estimate in estimates]
    axes.plot(
        layers,
        [float("nan") if value is None else value for value in values],
        color=colour,
        marker="o",
        markersize=4,
        label=label,
    )
    bounded = [(layer, e["interval"]) for layer, e in zip(layers, estimates, strict=True) if e.get("interval")]
    if bounded:
        axes.fill_between(
            [layer for layer, _ in bounded],
            [interval[0] for _, interval in bounded],
            [interval[1] for _, interval in bounded],
            color=colour,
            alpha=0.18,
            linewidth=0,
        )
    chosen_value = (
        (by_layer[chosen].get(name) or {}).get("value") if chosen is not None and chosen in by_layer else None
    )
    if chosen is not None and chosen_value is not None:
        axes.plot([chosen], [chosen_value], marker="o", markersize=11, markerfacecolor="none", color=colour)


def render_sweep_svg(curves: Curves, title: str, chosen: Mapping[str, int] | None = None) -> str:
    """The same curves always give the same bytes (no date, fixed element ids)."""
    import matplotlib

    buffer = io.BytesIO()
    with matplotlib.rc_context({"svg.hashsalt": "confprobe"}):
        sweep_figure(curves, title, chosen).savefig(buffer, format="svg", metadata={"Date": None})
    return buffer.getvalue().decode("utf-8")


def render_sweep_png(curves: Curves, title: str, chosen: Mapping[str, int] | None = None, dpi: int = 100) -> bytes:
    buffer = io.BytesIO()
    sweep_figure(curves, title, chosen).savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def sweep_section(curves: Curves, title: str, chosen: Mapping[str, int] | None = None) -> str:
    """The figure as a `<figure id="layer-sweep">` to put in a page."""
    caption = (
        "Test-split AUROC and ECE at every layer with 95% bootstrap intervals (bands); "
        "a ring marks the layer chosen on the validation split."
    )
    return (
        f'<figure id="layer-sweep">{inline_svg(render_sweep_svg(curves, title, chosen))}'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
    )


def render_run_html(
    title: str, curves: Curves, chosen: Mapping[str, int], rows: Sequence[Sequence[str]], notes: Sequence[str] = ()
) -> str:
    """A probe run's page: the sweep, then a table of every probe (`rows`: layer, method,
    best mark, then AUROC, ECE and Brier as `value [low, high]`); strings escaped."""
    headers = ("layer", "method", "best on validation", "AUROC", "ECE", "Brier")
    head = "".join(f'<th scope="col">{html.escape(header)}</th>' for header in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>" for row in rows)
    note_items = "".join(f"<li>{html.escape(note)}</li>" for note in notes)
    return (
        "<!DOCTYPE html>\n"
        f'<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{PAGE_STYLE}{PAGE_EXTRA}</style></head><body>\n"
        f"<h1>{html.escape(title)}</h1>\n{sweep_section(curves, title, chosen)}\n"
        f'<table id="probes"><thead><tr>{head}</tr></thead><tbody>{body}</tbody>'
        "<caption>Held-out test split; 95% bootstrap intervals.</caption></table>\n"
        + (f'<ul class="notes">{note_items}</ul>\n' if note_items else "")
        + "</body></html>\n"
    )


def estimate_cell(metrics: Mapping[str, Any], name: str) -> str:
    return format_estimate(metrics.get(name)) if metrics.get(name) else MISSING
