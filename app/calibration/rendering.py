"""Report rendering: the reliability diagram, the confidence histogram, the risk–coverage
curve and the metrics table.

A report is the JSON-ready dict of `CalibrationReport.to_dict()`; a comparison passes
several, each labelled (`("base", report), ("adapter sft-v1", report2)`). Any metric,
interval or bin mean may be missing, and renders as "—"; a report stored before it had a
risk–coverage curve draws none.

The gateway imports this module at start-up, so matplotlib is imported only inside the
functions that draw, and numpy not at all.
"""

from __future__ import annotations

import html
import io
import itertools
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

Report = Mapping[str, Any]
LabelledReports = Sequence[tuple[str, Report]]
# {adapter label: {metric name: {"value": d, "interval": [lo, hi]}}}
Differences = Mapping[str, Mapping[str, Mapping[str, Any]]]
# (baseline title, {metric name: {"value", "interval", "label", "better", "verdict"}}), as a
# report's `versus_baselines` holds them (`app.calibration.reporting.Baselines.versus`)
LabelledVersus = Sequence[tuple[str, Mapping[str, Mapping[str, Any]]]]

MISSING = "—"
FIGURE_INCHES = (12.0, 6.0)
FIGURE_LABEL_CHARACTERS = 40
# how many characters of 10-point legend text fit across the figure, and what a legend
# entry's line and gaps take beside its label, in characters
LEGEND_LINE_CHARACTERS = 150
LEGEND_HANDLE_CHARACTERS = 8
SMALLEST_MARKER_AREA = 12.0
LARGEST_MARKER_AREA = 320.0
# The order a reader takes a report in; metrics not listed follow in the order they appear.
METRIC_ORDER = (
    "accuracy",
    "auroc",
    "auprc",
    "aurc",
    "prr",
    "brier",
    "nll",
    "ece",
    "ece_equal_mass",
    "ece_l2",
    "ece_equal_mass_l2",
    "ece_max_probability",
    "mce",
    "ace",
    "smooth_ece",
    "debiased_ece",
)
# How the table marks an interval that is not a percentile one, and what the caption says of it.
INTERVAL_MARKS = {"bca": "†", "basic": "‡"}
INTERVAL_WORDS = {
    "bca": "BCa (bias-corrected and accelerated percentiles)",
    "basic": "basic (percentiles reflected about the value)",
}


# How pages name the model's own confidences (docs/concepts.md#baselines).
BASELINE_TITLES = {
    "own_probability": "own probability",
    "entropy": "1 − normalised entropy",
    "margin": "top-two margin",
    "p_true": "P(True)",
}


def baseline_title(name: str) -> str:
    return f"baseline: {BASELINE_TITLES.get(name, name)}"


# --- The figure ------------------------------------------------------------------------


def reliability_figure(reports: LabelledReports) -> Figure:
    """Left, the reliability diagram: one curve per report through its non-empty
    equal-width bins, marker area growing with the bin's count. Right, above, the
    confidence histogram, one bar per report in each bin; below, the risk–coverage curve,
    one line per report with its random level (the error rate) dashed."""
    from matplotlib.figure import Figure

    # Figure, not pyplot: no global state and no display, so requests may draw concurrently.
    figure = Figure(figsize=FIGURE_INCHES, layout="constrained")
    grid = figure.add_gridspec(2, 2)
    reliability = figure.add_subplot(grid[:, 0])
    histogram, risk_coverage = figure.add_subplot(grid[0, 1]), figure.add_subplot(grid[1, 1])
    largest_count = max((bin_["count"] for _, report in reports for bin_ in plotted_bins(report)), default=1)
    curves = [
        draw_reliability_curve(reliability, index, report, largest_count) for index, (_, report) in enumerate(reports)
    ]
    for index, (_, report) in enumerate(reports):
        draw_histogram_bars(histogram, index, len(reports), report)
    risk_lines = {
        index: line
        for index, (_, report) in enumerate(reports)
        if (line := draw_risk_coverage_curve(risk_coverage, index, report)) is not None
    }
    style_reliability_axes(reliability, diagram_bins_description(reports), largest_count)
    style_histogram_axes(histogram)
    style_risk_coverage_axes(
        risk_coverage,
        list(risk_lines.values()),
        [f"AURC {format_estimate(metric(reports[index][1], 'aurc'))}" for index in risk_lines],
    )
    labels = [legend_label(label, report) for label, report in reports]
    figure.legend(
        curves,
        labels,
        loc="outside lower center",
        ncols=legend_columns(labels),
        frameon=False,
        fontsize=10,
    )
    return figure


def legend_columns(labels: Sequence[str]) -> int:
    """Up to three columns, as many as fit the figure's width with the longest label."""
    longest = max((len(label) for label in labels), default=1) + LEGEND_HANDLE_CHARACTERS
    return max(1, min(len(labels), 3, LEGEND_LINE_CHARACTERS // longest))


def render_svg(reports: LabelledReports) -> str:
    """The same reports always give the same bytes (no date, fixed element ids)."""
    import matplotlib

    buffer = io.BytesIO()
    with matplotlib.rc_context({"svg.hashsalt": "confprobe"}):
        reliability_figure(reports).savefig(buffer, format="svg", metadata={"Date": None})
    return buffer.getvalue().decode("utf-8")


def render_png(reports: LabelledReports, dpi: int = 100) -> bytes:
    """A PNG of `FIGURE_INCHES` × `dpi` pixels (1200 × 600 at the default)."""
    buffer = io.BytesIO()
    reliability_figure(reports).savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def plotted_bins(report: Report) -> list[Mapping[str, Any]]:
    """The equal-width bins that have items and both means."""
    return [
        bin_
        for bin_ in (report.get("bins") or {}).get("equal_width", [])
        if bin_.get("count") and bin_.get("mean_confidence") is not None and bin_.get("accuracy") is not None
    ]


def marker_area(count: int, largest_count: int) -> float:
    """Area grows linearly with the count; the floor keeps one-item bins visible."""
    return SMALLEST_MARKER_AREA + (LARGEST_MARKER_AREA - SMALLEST_MARKER_AREA) * count / max(largest_count, 1)


def draw_reliability_curve(axes: Axes, index: int, report: Report, largest_count: int) -> Any:
    """The curve's line, with gid `curve-<index>` so the SVG names it."""
    bins = plotted_bins(report)
    confidences = [bin_["mean_confidence"] for bin_ in bins]
    accuracies = [bin_["accuracy"] for bin_ in bins]
    color = f"C{index % 10}"
    (line,) = axes.plot(
        confidences, accuracies, color=color, linewidth=1.8, marker="o", markersize=3, gid=f"curve-{index}", zorder=3
    )
    axes.scatter(
        confidences,
        accuracies,
        s=[marker_area(bin_["count"], largest_count) for bin_ in bins],
        color=color,
        alpha=0.35,
        edgecolors=color,
        linewidths=0.8,
        gid=f"bins-{index}",
        zorder=2,
    )
    return line


def draw_histogram_bars(axes: Axes, index: int, report_count: int, report: Report) -> None:
    """Bars side by side within each bin, so every report's count can be read off."""
    histogram = report.get("histogram")
    if not histogram:
        return
    edges, counts = histogram["edges"], histogram["counts"]
    widths = [(upper - lower) / report_count for lower, upper in itertools.pairwise(edges)]
    lefts = [lower + width * index for lower, width in zip(edges, widths, strict=False)]
    axes.bar(lefts, counts, widths, align="edge", color=f"C{index % 10}", alpha=0.85, gid=f"histogram-{index}")


def style_reliability_axes(axes: Axes, bins_description: str, largest_count: int) -> None:
    axes.plot([0, 1], [0, 1], linestyle="--", color="0.55", linewidth=1, zorder=1)
    axes.set(xlim=(-0.04, 1.04), ylim=(-0.04, 1.04), aspect="equal")
    axes.set_title(f"Reliability diagram — {bins_description}", fontsize=11)
    axes.set_xlabel("Mean confidence P(y=1) in bin")
    axes.set_ylabel("Accuracy in bin (fraction with y=1)")
    axes.grid(color="0.92")
    axes.text(
        0.03,
        0.97,
        "perfect calibration on the dashed diagonal",
        transform=axes.transAxes,
        fontsize=8,
        color="0.4",
        va="top",
    )
    counts = key_counts(largest_count)
    axes.legend(
        handles=[
            axes.scatter([], [], s=marker_area(count, largest_count), color="0.6", alpha=0.5, edgecolors="0.4")
            for count in counts
        ],
        labels=[str(count) for count in counts],
        title="items in bin",
        loc="lower right",
        fontsize=8,
        title_fontsize=8,
        labelspacing=1.1,
        borderpad=0.8,
        framealpha=0.9,
    )


def draw_risk_coverage_curve(axes: Axes, index: int, report: Report) -> Any:
    """The report's risk–coverage line (gid `risk-coverage-<index>`) and its random level,
    the error rate, dashed in the same colour (gid `risk-random-<index>`); None when the
    report has no curve."""
    curve = report.get("risk_coverage")
    if not curve or not curve.get("coverage"):
        return None
    color = f"C{index % 10}"
    (line,) = axes.plot(
        curve["coverage"], curve["risk"], color=color, linewidth=1.6, gid=f"risk-coverage-{index}", zorder=3
    )
    if report.get("base_rate") is not None:
        axes.axhline(
            1.0 - report["base_rate"], color=color, linestyle="--", linewidth=1, alpha=0.8, gid=f"risk-random-{index}"
        )
    return line


def style_risk_coverage_axes(axes: Axes, lines: list[Any], labels: list[str]) -> None:
    """A key of each line's AURC and of the dashed random level; a note where no report has a curve."""
    axes.set_xlim(0, 1)
    axes.set_ylim(bottom=0)
    axes.set_title("Risk–coverage — most confident kept first, lower is better", fontsize=11)
    axes.set_xlabel("Coverage (fraction of items kept)")
    axes.set_ylabel("Risk (wrong among kept)")
    axes.grid(color="0.92")
    if not lines:
        axes.text(
            0.5, 0.5, "no risk–coverage curve in these reports", transform=axes.transAxes, color="0.4", ha="center"
        )
        return
    (random_key,) = axes.plot([], [], color="0.45", linestyle="--", linewidth=1)
    axes.legend(
        handles=[*lines, random_key],
        labels=[*labels, "random order: the error rate"],
        loc="lower right",
        fontsize=8,
        framealpha=0.9,
    )


def style_histogram_axes(axes: Axes) -> None:
    axes.set_xlim(0, 1)
    axes.set_title("Confidence histogram", fontsize=11)
    axes.set_xlabel("Confidence P(y=1)")
    axes.set_ylabel("Items")
    axes.grid(axis="y", color="0.92")
    axes.set_axisbelow(True)


def key_counts(largest_count: int) -> list[int]:
    """Up to three counts for the marker key: two round ones (1, 2, 5, 10, 20, …) and the
    largest bin's, so the key spans every marker drawn."""
    return sorted({round_count_down(largest_count / 10), round_count_down(largest_count / 3), largest_count})


def round_count_down(count: float) -> int:
    if count < 1:
        return 1
    magnitude = 10 ** math.floor(math.log10(count))
    return max(step * magnitude for step in (1, 2, 5) if step * magnitude <= count)


def diagram_bins_description(reports: LabelledReports) -> str:
    """Which ECE the diagram's bins are the bins of, from the `ece` metric's estimator."""
    for _, report in reports:
        estimator = (metric(report, "ece") or {}).get("estimator")
        if estimator:
            binning = str(estimator.get("binning", "equal_width")).replace("_", "-")
            return f"bins of ECE: {estimator.get('bins')} {binning}, {str(estimator.get('norm', '')).upper()}, {estimator.get('form', '')} P(y=1)"
    bin_count = max((len((report.get("bins") or {}).get("equal_width", [])) for _, report in reports), default=0)
    return f"{bin_count} equal-width bins"


def legend_label(label: str, report: Report) -> str:
    return f"{figure_text(label)} — ECE {format_estimate(metric(report, 'ece'))}"


def figure_text(label: str) -> str:
    """A label as matplotlib should print it: shortened, and with `$` kept literal rather
    than starting mathtext (which a stray `$` would make fail)."""
    if len(label) > FIGURE_LABEL_CHARACTERS:
        label = label[: FIGURE_LABEL_CHARACTERS - 1] + "…"
    return label.replace("$", r"\$")


def metric(report: Report, name: str) -> Mapping[str, Any] | None:
    return (report.get("metrics") or {}).get(name)


# --- Numbers -----------------------------------------------------------------------------


def format_number(value: Any, *, signed: bool = False) -> str:
    """Three decimals; a value that rounds to zero prints as zero, never `-0.000`."""
    if value is None or not math.isfinite(value):
        return MISSING
    if round(value, 3) == 0:
        value = 0.0
    return f"{value:+.3f}" if signed else f"{value:.3f}"


def format_estimate(estimate: Mapping[str, Any] | None, *, signed: bool = False) -> str:
    """A value and its interval, `0.812 [0.776, 0.845]`; `0.812 [—]` without an interval,
    `—` without a value."""
    if not estimate or estimate.get("value") is None:
        return MISSING
    value = format_number(estimate["value"], signed=signed)
    interval = estimate.get("interval")
    if not interval or any(bound is None for bound in interval):
        return f"{value} [{MISSING}]"
    lower, upper = (format_number(bound, signed=signed) for bound in interval)
    return f"{value} [{lower}, {upper}]"


# --- The page ----------------------------------------------------------------------------


PAGE_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 2rem auto; max-width: 80rem; padding: 0 1rem; color: #1b1b1b; }
h1 { font-size: 1.5rem; }
#reliability-diagram svg, #layer-sweep svg { width: 100%; height: auto; }
table { border-collapse: collapse; font-variant-numeric: tabular-nums; margin: 1rem 0; }
caption { caption-side: bottom; text-align: left; color: #555; font-size: 0.9rem; padding-top: 0.5rem; }
th, td { padding: 0.3rem 0.8rem; border-bottom: 1px solid #ddd; text-align: right; white-space: nowrap; }
th[scope=row] { text-align: left; font-weight: normal; white-space: normal; min-width: 12rem; max-width: 28rem; }
.scrolls { overflow-x: auto; }
thead th { border-bottom: 2px solid #888; white-space: normal; vertical-align: bottom; }
thead th:first-child, thead th.better { text-align: left; }
td.difference { background: #f6f6f2; }
td.versus .verdict { display: block; font-size: 0.85rem; }
td.verdict-probe { background: #e2f2df; }
td.verdict-probe .verdict { color: #1d5b1a; font-weight: 600; }
td.verdict-baseline { background: #f9e1de; }
td.verdict-baseline .verdict { color: #7a1f14; font-weight: 600; }
td.verdict-none .verdict { color: #777; }
td.better { text-align: left; color: #444; }
h2 { font-size: 1.15rem; margin-top: 2rem; }
.notes { color: #444; }
"""


def render_html(
    title: str,
    reports: LabelledReports,
    *,
    differences: Differences | None = None,
    versus: LabelledVersus = (),
    notes: Sequence[str] = (),
    sections: Sequence[str] = (),
) -> str:
    """A self-contained page (inline SVG and CSS, nothing fetched) with the diagram, the
    metrics table, given `versus` the probe-versus-baselines table, then `sections` (HTML
    made by the caller, a figure say); every string from the caller is escaped."""
    note_items = "".join(f"<li>{html.escape(note)}</li>" for note in notes)
    return (
        "<!DOCTYPE html>\n"
        f'<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{PAGE_STYLE}</style></head><body>\n"
        f"<h1>{html.escape(title)}</h1>\n"
        f'<figure id="reliability-diagram">{inline_svg(render_svg(reports))}</figure>\n'
        f'<div class="scrolls">{metrics_table(reports, differences or {})}</div>\n'
        + (f"<h2>Probe vs baselines</h2>\n{versus_table(versus)}\n" if versus else "")
        + "".join(f"{section}\n" for section in sections)
        + (f'<ul class="notes">{note_items}</ul>\n' if note_items else "")
        + "</body></html>\n"
    )


def inline_svg(svg_document: str) -> str:
    """The `<svg>` element alone: an XML declaration or DOCTYPE is out of place inside HTML."""
    return svg_document[svg_document.index("<svg") :]


def metrics_table(reports: LabelledReports, differences: Differences) -> str:
    header = "".join(f'<th scope="col">{html.escape(label)}</th>' for label, _ in reports)
    header += "".join(f'<th scope="col">Δ {html.escape(label)}</th>' for label in differences)
    rows = [
        table_row("n", "n", [format_count(report.get("n")) for _, report in reports], [MISSING] * len(differences)),
        table_row(
            "base_rate",
            "Base rate",
            [format_number(report.get("base_rate")) for _, report in reports],
            [MISSING] * len(differences),
        ),
    ]
    rows += [
        table_row(
            name,
            metric_label(name, reports),
            [marked_estimate(metric(report, name)) for _, report in reports],
            [marked_estimate(by_metric.get(name), signed=True) for by_metric in differences.values()],
        )
        for name in metric_names(reports, differences)
    ]
    return (
        f'<table id="metrics"><caption>{html.escape(table_caption(reports, differences))}</caption>'
        f'<thead><tr><th scope="col">Metric</th>{header}</tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table>"
    )


def table_row(name: str, label: str, cells: Sequence[str], difference_cells: Sequence[str]) -> str:
    values = "".join(f"<td>{html.escape(cell)}</td>" for cell in cells)
    values += "".join(f'<td class="difference">{html.escape(cell)}</td>' for cell in difference_cells)
    return f'<tr data-metric="{html.escape(name)}"><th scope="row">{html.escape(label)}</th>{values}</tr>'


def marked_estimate(estimate: Mapping[str, Any] | None, *, signed: bool = False) -> str:
    """`format_estimate`, its interval marked by `INTERVAL_MARKS` where it is not a percentile one."""
    text = format_estimate(estimate, signed=signed)
    mark = INTERVAL_MARKS.get(str((estimate or {}).get("interval_method")))
    return f"{text} {mark}" if mark and (estimate or {}).get("interval") else text


def format_count(count: Any) -> str:
    return MISSING if count is None else str(count)


def metric_names(reports: LabelledReports, differences: Differences) -> list[str]:
    """Every metric some report or difference has, known ones in `METRIC_ORDER`."""
    present = dict.fromkeys(name for metrics in metric_dicts(reports, differences) for name in metrics)
    return [name for name in METRIC_ORDER if name in present] + [name for name in present if name not in METRIC_ORDER]


def metric_dicts(reports: LabelledReports, differences: Differences) -> Iterator[Mapping[str, Any]]:
    yield from (report.get("metrics") or {} for _, report in reports)
    yield from differences.values()


def metric_label(name: str, reports: LabelledReports) -> str:
    """The label the first report that has the metric gives it; its name otherwise."""
    for _, report in reports:
        label = (metric(report, name) or {}).get("label")
        if label:
            return str(label)
    return name


def table_caption(reports: LabelledReports, differences: Differences) -> str:
    settings = {label: bootstrap_description(report) for label, report in reports if report.get("bootstrap")}
    caption = "Each value with its bootstrap interval [lower, upper]"
    if len(set(settings.values())) == 1:
        caption += f" ({next(iter(settings.values()))})."
    elif settings:
        caption += f" ({'; '.join(f'{label}: {setting}' for label, setting in settings.items())})."
    else:
        caption += "."
    caption += interval_methods_caption(reports, differences)
    if differences and reports:
        caption += f" Δ columns: the value minus the {reports[0][0]} column's, with a paired-bootstrap interval."
    return caption


def interval_methods_caption(reports: LabelledReports, differences: Differences) -> str:
    """What the marks of the table's intervals mean, for the methods it shows."""
    shown = {
        str(entry.get("interval_method"))
        for metrics in metric_dicts(reports, differences)
        for entry in metrics.values()
        if entry.get("interval")
    }
    marked = [f"{INTERVAL_MARKS[method]} {INTERVAL_WORDS[method]}" for method in INTERVAL_MARKS if method in shown]
    if not marked:
        return ""
    return (
        " Intervals are percentile ones except where marked: "
        + "; ".join(marked)
        + " — the binned calibration errors' resamples run above the value, and these correct for that bias."
        " Each interval is widened, where needed, to hold its value."
    )


def bootstrap_description(report: Report) -> str:
    bootstrap = report["bootstrap"]
    level = bootstrap.get("level")
    level_text = f"{level * 100:g}%" if level is not None else "level unknown"
    return f"{level_text}, {bootstrap.get('resamples')} resamples, seed {bootstrap.get('seed')}"


VERDICT_CLASSES = {"probe better": "verdict-probe", "baseline better": "verdict-baseline"}


def versus_table(versus: LabelledVersus) -> str:
    """Per metric, which way it improves, then for each baseline the probe's value minus the
    baseline's with its paired interval, and under it the verdict."""
    header = "".join(f'<th scope="col">probe − {html.escape(title)}</th>' for title, _ in versus)
    rows = []
    for name in metric_names((), {title: by_metric for title, by_metric in versus}):
        entries = [by_metric.get(name) or {} for _, by_metric in versus]
        label = next((str(entry["label"]) for entry in entries if entry.get("label")), name)
        better = next((str(entry["better"]) for entry in entries if entry.get("better")), "")
        cells = "".join(
            f'<td class="versus {VERDICT_CLASSES.get(entry.get("verdict", ""), "verdict-none")}">'
            f"{html.escape(format_estimate(entry, signed=True))}"
            f'<span class="verdict">{html.escape(str(entry.get("verdict") or MISSING))}</span></td>'
            for entry in entries
        )
        rows.append(
            f'<tr data-metric="{html.escape(name)}"><th scope="row">{html.escape(label)}</th>'
            f'<td class="better">{html.escape(BETTER_WORDS.get(better, MISSING))}</td>{cells}</tr>'
        )
    return (
        f'<table id="versus-baselines"><caption>{html.escape(VERSUS_CAPTION)}</caption>'
        f'<thead><tr><th scope="col">Metric</th><th scope="col" class="better">Better</th>{header}</tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table>"
    )


BETTER_WORDS = {"higher": "higher ↑", "lower": "lower ↓"}


VERSUS_CAPTION = (
    "The probe's value minus the baseline's on the same test items, with a paired-bootstrap interval "
    "(the items resampled together, as in the table above). The probe is better when the interval excludes 0 "
    "on the metric's better side, the baseline when it excludes 0 on the other; otherwise, or without an "
    f"interval (smooth ECE), there is no clear difference ({MISSING} where a value is undefined)."
)
