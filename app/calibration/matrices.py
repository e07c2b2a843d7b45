"""A transfer matrix drawn: a heatmap of AUROC (training set by test set, each cell with its
interval), and a page with it and the AUROC, accuracy and ECE tables.

`matrix` is the JSON-ready dict the transfer job writes (`rows`, `columns`, `cells`). As for
the calibration reports, matplotlib is imported only inside the functions that draw.
"""

from __future__ import annotations

import html
import io
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from app.calibration.rendering import MISSING, PAGE_STYLE, format_estimate, format_number, inline_svg

if TYPE_CHECKING:
    from matplotlib.figure import Figure

Matrix = Mapping[str, Any]
TABLE_METRICS = (("auroc", "AUROC"), ("accuracy", "Accuracy"), ("ece", "ECE"))
PAGE_EXTRA = "#heatmap svg { width: 100%; height: auto; } h2 { font-size: 1.15rem; margin-top: 2rem; }\n"


def row_label(row: Mapping[str, Any]) -> str:
    return f"{row['label']} (layer {row['layer']})"


def column_label(column: Mapping[str, Any]) -> str:
    return f"{column['label']} ({column['rows']}, n={column['n']})"


def heatmap_figure(matrix: Matrix, title: str) -> Figure:
    """AUROC of each training row's probe on each test column, coloured on a diverging
    scale centred on chance (0.5); each cell shows its value and interval."""
    import numpy as np
    from matplotlib.figure import Figure

    rows, columns = matrix["rows"], matrix["columns"]
    values = np.array(
        [
            [np.nan if (v := cell["metrics"]["auroc"]["value"]) is None else v for cell in row]
            for row in matrix["cells"]
        ],
        dtype=float,
    )
    width = 2.0 + 1.6 * len(columns) + 0.06 * max(len(row_label(row)) for row in rows)
    # a row or two still gets room for the column labels and a readable colour bar
    figure = Figure(figsize=(max(width, 6.0), max(3.6, 1.8 + 0.9 * len(rows))), layout="constrained")
    axes = figure.subplots()
    image = axes.imshow(np.ma.masked_invalid(values), cmap="RdBu_r", vmin=0.0, vmax=1.0, aspect="auto")
    for i, row in enumerate(matrix["cells"]):
        for j, cell in enumerate(row):
            estimate = cell["metrics"]["auroc"]
            text = format_estimate(estimate).replace(" [", "\n[") if estimate.get("value") is not None else MISSING
            shade = values[i, j]
            colour = "white" if not np.isnan(shade) and abs(shade - 0.5) > 0.3 else "black"
            axes.text(j, i, text, ha="center", va="center", fontsize=9, color=colour)
    axes.set_xticks(range(len(columns)), [column_label(column) for column in columns], rotation=20, ha="right")
    axes.set_yticks(range(len(rows)), [row_label(row) for row in rows])
    axes.set_xlabel("scored on")
    axes.set_ylabel("trained on")
    axes.set_title(title, fontsize=11)
    figure.colorbar(image, ax=axes, label="AUROC (0.5: chance)")
    return figure


def render_matrix_svg(matrix: Matrix, title: str) -> str:
    """The same matrix always gives the same bytes (no date, fixed element ids)."""
    import matplotlib

    buffer = io.BytesIO()
    with matplotlib.rc_context({"svg.hashsalt": "confprobe"}):
        heatmap_figure(matrix, title).savefig(buffer, format="svg", metadata={"Date": None})
    return buffer.getvalue().decode("utf-8")


def render_matrix_png(matrix: Matrix, title: str, dpi: int = 100) -> bytes:
    buffer = io.BytesIO()
    heatmap_figure(matrix, title).savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def metric_table(matrix: Matrix, name: str, heading: str) -> str:
    header = "".join(f'<th scope="col">{html.escape(column_label(column))}</th>' for column in matrix["columns"])
    body = "".join(
        f'<tr><th scope="row">{html.escape(row_label(row))}</th>'
        + "".join(f"<td>{html.escape(format_estimate(cell['metrics'].get(name)))}</td>" for cell in cells)
        + "</tr>"
        for row, cells in zip(matrix["rows"], matrix["cells"], strict=True)
    )
    label = next((cell["metrics"][name].get("label") for cells in matrix["cells"] for cell in cells), None) or heading
    return (
        f'<h2>{html.escape(heading)}</h2><div class="scrolls"><table id="{name}"><thead><tr><th scope="col">trained on ↓ / scored on →</th>'
        f"{header}</tr></thead><tbody>{body}</tbody><caption>{html.escape(label)}; 95% bootstrap intervals"
        "</caption></table></div>"
    )


def layer_table(matrix: Matrix) -> str:
    """Each training row's validation AUROC per layer: how clear the choice of layer was."""
    layers = list(matrix["rows"][0]["validation_auroc"]) if matrix["rows"] else []
    header = "".join(f'<th scope="col">layer {html.escape(layer)}</th>' for layer in layers)
    body = "".join(
        f'<tr><th scope="row">{html.escape(row["label"])}</th>'
        + "".join(
            f"<td>{'<b>' if int(layer) == row['layer'] else ''}"
            f"{html.escape(format_number(row['validation_auroc'][layer]))}"
            f"{'</b>' if int(layer) == row['layer'] else ''}</td>"
            for layer in layers
        )
        + "</tr>"
        for row in matrix["rows"]
    )
    return (
        f'<h2>Validation AUROC by layer</h2><table id="layers"><thead><tr><th scope="col">trained on</th>{header}'
        f"</tr></thead><tbody>{body}</tbody><caption>On each training set's validation split; the chosen layer in bold."
        "</caption></table>"
    )


def render_matrix_html(matrix: Matrix, title: str, notes: Sequence[str] = ()) -> str:
    """A self-contained page (inline SVG and CSS, nothing fetched); every string escaped."""
    note_items = "".join(f"<li>{html.escape(note)}</li>" for note in notes)
    tables = "\n".join(metric_table(matrix, name, heading) for name, heading in TABLE_METRICS)
    return (
        "<!DOCTYPE html>\n"
        f'<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{PAGE_STYLE}{PAGE_EXTRA}</style></head><body>\n"
        f"<h1>{html.escape(title)}</h1>\n"
        f'<figure id="heatmap">{inline_svg(render_matrix_svg(matrix, title))}</figure>\n'
        f"{tables}\n{layer_table(matrix)}\n"
        + (f'<ul class="notes">{note_items}</ul>\n' if note_items else "")
        + "</body></html>\n"
    )
