"""Report rendering: the reliability diagram, histogram and risk–coverage curve as SVG and
PNG, and the self-contained HTML page.

Reports are built here, from synthetic bins or synthetic predictions, so these tests do
not depend on the metrics module. `python -m tests.calibration.test_report` rewrites
`docs/report-example.png` from the service's reports of the realistic comparison's predictions.
"""

import io
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import numpy as np
import pytest
from matplotlib.image import imread

from app.calibration.rendering import (
    format_number,
    legend_columns,
    reliability_figure,
    render_html,
    render_png,
    render_svg,
)
from tests.conftest import ROOT, require

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
BINS = 15
ECE_LABEL = "ECE — 15 equal-width bins, L1, binary P(y=1)"
ECE_ESTIMATOR = {"name": "ece", "bins": BINS, "binning": "equal_width", "norm": "l1", "form": "binary"}
BOOTSTRAP = {"resamples": 1000, "seed": 0, "level": 0.95}


# --- Reports from synthetic bins ---------------------------------------------------------


def report_from_bins(bins: dict[int, tuple[int, float, float]], metrics: dict[str, Any]) -> dict[str, Any]:
    """A report whose equal-width bins are `{bin index: (count, mean confidence, accuracy)}`,
    the other bins empty; n, base rate and histogram follow from the bins."""
    edges = [index / BINS for index in range(BINS + 1)]
    equal_width = [
        {"lower": edges[index], "upper": edges[index + 1], "count": 0, "mean_confidence": None, "accuracy": None}
        for index in range(BINS)
    ]
    for index, (count, confidence, accuracy) in bins.items():
        equal_width[index] |= {"count": count, "mean_confidence": confidence, "accuracy": accuracy}
    n = sum(count for count, _, _ in bins.values())
    return {
        "n": n,
        "base_rate": sum(count * accuracy for count, _, accuracy in bins.values()) / n,
        "metrics": metrics,
        "bins": {"equal_width": equal_width, "equal_mass": []},
        "histogram": {"edges": edges, "counts": [bin_["count"] for bin_ in equal_width]},
        "bootstrap": BOOTSTRAP,
    }


BASE = report_from_bins(
    {1: (20, 0.10, 0.15), 5: (40, 0.35, 0.45), 8: (60, 0.55, 0.50), 11: (80, 0.75, 0.70), 14: (100, 0.97, 0.90)},
    {
        "accuracy": {"value": 0.812, "interval": [0.776, 0.845], "label": "Accuracy (threshold 0.5)"},
        "auroc": {"value": 0.874, "interval": [0.841, 0.903], "label": "AUROC (ties count half)"},
        "brier": {"value": 0.139, "interval": None, "label": "Brier score"},
        "ece": {"value": 0.052, "interval": [0.031, 0.071], "label": ECE_LABEL, "estimator": ECE_ESTIMATOR},
    },
)
ADAPTER = report_from_bins(
    {0: (30, 0.04, 0.10), 7: (50, 0.50, 0.40), 13: (220, 0.90, 0.78)},
    {
        "accuracy": {"value": 0.790, "interval": [0.751, 0.826], "label": "Accuracy (threshold 0.5)"},
        "brier": {"value": 0.151, "interval": [0.132, 0.170], "label": "Brier score"},
        "ece": {"value": 0.098, "interval": [0.074, 0.121], "label": ECE_LABEL, "estimator": ECE_ESTIMATOR},
    },
)
# The base has a risk–coverage curve; the adapter's report is one stored before reports had them.
BASE["risk_coverage"] = {"coverage": [0.25, 0.5, 0.75, 1.0], "risk": [0.0, 0.1, 0.15, 0.188]}
BASE["metrics"]["aurc"] = {"value": 0.09, "interval": [0.07, 0.11], "label": "AURC", "interval_method": "percentile"}
BASE["metrics"]["ece"] |= {"interval_method": "bca"}
ADAPTER["metrics"]["ece"] |= {"interval_method": "basic"}
TWO_REPORTS = [("base", BASE), ("adapter sft-v1", ADAPTER)]
DIFFERENCES: dict[str, dict[str, dict[str, Any]]] = {
    "adapter sft-v1": {
        "accuracy": {"value": -0.022, "interval": [-0.051, 0.004]},
        "ece": {"value": 0.046, "interval": None},
    }
}
HOSTILE = "<script>alert(1)</script>"


@pytest.fixture(scope="module")
def page() -> str:
    return render_html(
        "Probe p-1: base vs adapter", TWO_REPORTS, differences=DIFFERENCES, notes=["layer 16, last token"]
    )


def table_cells(page: str, metric: str) -> list[str]:
    """The row header and cells of the metrics table's row for `metric`."""
    row = re.search(rf'<tr data-metric="{metric}">(.*?)</tr>', page)
    assert row, f"no row for {metric}"
    return re.findall(r"<t[hd][^>]*>(.*?)</t[hd]>", row.group(1))


# --- Reports from synthetic predictions ----------------------------------------------------


def bootstrap_estimate(
    statistic: Any, confidences: np.ndarray, outcomes: np.ndarray, label: str, rng: np.random.Generator
) -> dict[str, Any]:
    resampled = rng.integers(0, len(confidences), size=(200, len(confidences)))
    values = [statistic(confidences[rows], outcomes[rows]) for rows in resampled]
    lower, upper = np.percentile(values, [2.5, 97.5])
    return {"value": float(statistic(confidences, outcomes)), "interval": [float(lower), float(upper)], "label": label}


def risks_kept(confidences: np.ndarray, outcomes: np.ndarray) -> np.ndarray:
    """Fraction wrong among the k most confident, for k = 1 … n (no tied confidences here)."""
    wrong = 1.0 - outcomes[np.argsort(-confidences)]
    return np.cumsum(wrong) / np.arange(1, len(wrong) + 1)


def equal_width_ece(confidences: np.ndarray, outcomes: np.ndarray) -> float:
    bins = np.minimum((confidences * BINS).astype(int), BINS - 1)
    counts = np.bincount(bins, minlength=BINS)
    gaps = np.bincount(bins, weights=confidences - outcomes, minlength=BINS)
    return float(np.abs(gaps).sum() / counts.sum())


def report_from_predictions(confidences: np.ndarray, outcomes: np.ndarray, seed: int) -> dict[str, Any]:
    """A report as the service would give it for these predictions, with accuracy, Brier
    and ECE (the other metrics absent)."""
    rng = np.random.default_rng(seed)
    bins = np.minimum((confidences * BINS).astype(int), BINS - 1)
    counts = np.bincount(bins, minlength=BINS)
    equal_width = [
        {
            "lower": index / BINS,
            "upper": (index + 1) / BINS,
            "count": int(counts[index]),
            "mean_confidence": float(confidences[bins == index].mean()) if counts[index] else None,
            "accuracy": float(outcomes[bins == index].mean()) if counts[index] else None,
        }
        for index in range(BINS)
    ]
    ece = bootstrap_estimate(equal_width_ece, confidences, outcomes, ECE_LABEL, rng) | {"estimator": ECE_ESTIMATOR}
    kept = np.unique(np.ceil(np.linspace(0.0, 1.0, 101)[1:] * len(confidences)).astype(int))
    risks = risks_kept(confidences, outcomes)
    return {
        "n": len(confidences),
        "base_rate": float(outcomes.mean()),
        "metrics": {
            "accuracy": bootstrap_estimate(
                lambda c, y: ((c >= 0.5) == y).mean(), confidences, outcomes, "Accuracy (threshold 0.5)", rng
            ),
            "aurc": bootstrap_estimate(
                lambda c, y: risks_kept(c, y).mean(), confidences, outcomes, "AURC (lower is better)", rng
            ),
            "brier": bootstrap_estimate(lambda c, y: ((c - y) ** 2).mean(), confidences, outcomes, "Brier score", rng),
            "ece": ece,
        },
        "bins": {"equal_width": equal_width, "equal_mass": []},
        "histogram": {"edges": [index / BINS for index in range(BINS + 1)], "counts": counts.tolist()},
        "risk_coverage": {
            "coverage": [1 / len(confidences), *(kept / len(confidences)).tolist()],
            "risk": [float(risks[0]), *risks[kept - 1].tolist()],
        },
        "bootstrap": {"resamples": 200, "seed": seed, "level": 0.95},
    }


def simulated_predictions(seed: int, sharpness: float, shift: float, items: int = 300) -> tuple[np.ndarray, np.ndarray]:
    """Probe confidences from two humps (likely wrong, likely right), and outcomes whose
    truth is the confidence's logit scaled by `sharpness` (< 1: overconfident) and moved by
    `shift`."""
    rng = np.random.default_rng(seed)
    right = rng.random(items) < 0.6
    confidences = np.where(right, rng.beta(5, 1.6, items), rng.beta(1.8, 4, items)).clip(1e-3, 1 - 1e-3)
    logits = np.log(confidences / (1 - confidences))
    outcomes = (rng.random(items) < 1 / (1 + np.exp(-(sharpness * logits + shift)))).astype(float)
    return confidences, outcomes


SIMULATED = {"base": (1, 0.75, 0.0), "adapter sft-v1": (2, 0.5, -0.3), "adapter dpo-v2": (3, 0.95, 0.1)}


def realistic_comparison() -> list[tuple[str, dict[str, Any]]]:
    return [
        (label, report_from_predictions(*simulated_predictions(seed, sharpness, shift), seed))
        for label, (seed, sharpness, shift) in SIMULATED.items()
    ]


# --- The figure -----------------------------------------------------------------------------


def test_svg_is_well_formed_xml() -> None:
    root = ElementTree.fromstring(render_svg(TWO_REPORTS))
    assert root.tag == "{http://www.w3.org/2000/svg}svg"


def test_svg_names_one_curve_per_report() -> None:
    svg = render_svg(TWO_REPORTS)
    assert re.findall(r'id="(curve-\d+)"', svg) == ["curve-0", "curve-1"]


def test_curves_pass_through_the_non_empty_bins_only() -> None:
    figure = reliability_figure(TWO_REPORTS)
    curve = next(line for line in figure.axes[0].get_lines() if line.get_gid() == "curve-1")
    confidences, accuracies = curve.get_xdata(), curve.get_ydata()
    assert isinstance(confidences, np.ndarray) and isinstance(accuracies, np.ndarray)
    assert list(confidences) == [0.04, 0.50, 0.90]
    assert list(accuracies) == [0.10, 0.40, 0.78]


def test_diagram_title_names_the_ece_variant_of_its_bins() -> None:
    title = reliability_figure(TWO_REPORTS).axes[0].get_title()
    assert "15 equal-width" in title and "L1" in title and "binary P(y=1)" in title


def test_legend_gives_each_report_its_ece_and_interval() -> None:
    legend = reliability_figure(TWO_REPORTS).legends[0]
    assert [text.get_text() for text in legend.get_texts()] == [
        "base — ECE 0.052 [0.031, 0.071]",
        "adapter sft-v1 — ECE 0.098 [0.074, 0.121]",
    ]


def test_risk_coverage_panel_draws_each_reports_curve_and_its_error_rate_dashed() -> None:
    axes = reliability_figure(TWO_REPORTS).axes[2]
    lines = {line.get_gid(): line for line in axes.get_lines() if line.get_gid()}
    assert set(lines) == {"risk-coverage-0", "risk-random-0"}  # the adapter's stored report has no curve
    assert np.asarray(lines["risk-coverage-0"].get_xdata()).tolist() == [0.25, 0.5, 0.75, 1.0]
    assert np.asarray(lines["risk-coverage-0"].get_ydata()).tolist() == [0.0, 0.1, 0.15, 0.188]
    assert np.asarray(lines["risk-random-0"].get_ydata()).tolist() == pytest.approx([1.0 - BASE["base_rate"]] * 2)
    assert lines["risk-random-0"].get_linestyle() == "--"


def test_risk_coverage_key_gives_each_curve_its_aurc_and_names_the_dashed_level() -> None:
    legend = reliability_figure(TWO_REPORTS).axes[2].get_legend()
    assert legend is not None
    assert [text.get_text() for text in legend.get_texts()] == [
        "AURC 0.090 [0.070, 0.110]",
        "random order: the error rate",
    ]


def test_reports_stored_before_risk_coverage_curves_leave_the_panel_with_a_note() -> None:
    axes = reliability_figure([("adapter sft-v1", ADAPTER)]).axes[2]
    assert not axes.get_lines()
    assert [text.get_text() for text in axes.texts] == ["no risk–coverage curve in these reports"]


def test_svg_names_each_risk_coverage_curve() -> None:
    svg = render_svg(realistic_comparison())
    assert re.findall(r'id="(risk-coverage-\d+)"', svg) == ["risk-coverage-0", "risk-coverage-1", "risk-coverage-2"]


def test_png_starts_with_the_png_signature() -> None:
    assert render_png(TWO_REPORTS).startswith(PNG_SIGNATURE)


@pytest.mark.parametrize(("dpi", "size"), [(100, (600, 1200)), (50, (300, 600))])
def test_png_is_twelve_by_six_inches_at_the_given_dpi(dpi: int, size: tuple[int, int]) -> None:
    assert imread(io.BytesIO(render_png(TWO_REPORTS, dpi=dpi))).shape[:2] == size


def test_labels_with_dollar_signs_render_as_text_not_mathtext() -> None:
    assert render_png([(r"run $\nosuchcommand$", BASE)]).startswith(PNG_SIGNATURE)


# --- The page ------------------------------------------------------------------------------


def test_page_holds_the_diagram_as_inline_svg(page: str) -> None:
    assert re.search(r'<figure id="reliability-diagram"><svg[ >]', page)
    assert "<?xml" not in page


def test_page_needs_nothing_from_the_network(page: str) -> None:
    assert "<script" not in page and "<link" not in page and "@import" not in page and "url(http" not in page
    assert all(target.startswith("#") for target in re.findall(r'href="([^"]*)"', page))


def test_table_has_a_row_per_metric_label(page: str) -> None:
    headers = [table_cells(page, metric)[0] for metric in ("n", "base_rate", "accuracy", "auroc", "brier", "ece")]
    assert headers == [
        "n",
        "Base rate",
        "Accuracy (threshold 0.5)",
        "AUROC (ties count half)",
        "Brier score",
        ECE_LABEL,
    ]


def test_table_gives_each_report_its_value_and_interval(page: str) -> None:
    assert table_cells(page, "accuracy")[1:3] == ["0.812 [0.776, 0.845]", "0.790 [0.751, 0.826]"]
    assert table_cells(page, "n")[1:3] == ["300", "300"]


def test_an_absent_metric_renders_as_a_dash(page: str) -> None:
    assert table_cells(page, "auroc")[2] == "—"


def test_a_null_interval_renders_as_a_dash(page: str) -> None:
    assert table_cells(page, "brier")[1] == "0.139 [—]"


def test_differences_add_a_signed_column_per_adapter(page: str) -> None:
    assert '<th scope="col">Δ adapter sft-v1</th>' in page
    assert table_cells(page, "accuracy")[3] == "-0.022 [-0.051, +0.004]"
    assert table_cells(page, "ece")[3] == "+0.046 [—]"


VERSUS: list[tuple[str, dict[str, dict[str, Any]]]] = [
    (
        "baseline: P(True)",
        {
            "auroc": {
                "value": 0.081,
                "interval": [0.012, 0.150],
                "label": "AUROC (ties count half)",
                "better": "higher",
                "verdict": "probe better",
            },
            "brier": {
                "value": 0.021,
                "interval": [0.004, 0.040],
                "label": "Brier score",
                "better": "lower",
                "verdict": "baseline better",
            },
            "smooth_ece": {
                "value": -0.0002,
                "interval": None,
                "label": "Smooth ECE",
                "better": "lower",
                "verdict": "no clear difference",
            },
        },
    )
]


@pytest.fixture(scope="module")
def versus_page() -> str:
    return render_html("Probe p-2", [("probe", BASE), ("baseline: P(True)", ADAPTER)], versus=VERSUS)


def versus_row(page: str, metric: str) -> str:
    table = page[page.index('<table id="versus-baselines">') :]
    row = re.search(rf'<tr data-metric="{metric}">(.*?)</tr>', table)
    assert row, f"no row for {metric}"
    return row.group(1)


def test_the_versus_table_gives_each_metric_its_direction_signed_difference_and_verdict(versus_page: str) -> None:
    assert "<h2>Probe vs baselines</h2>" in versus_page
    assert '<th scope="col">probe − baseline: P(True)</th>' in versus_page
    assert re.findall(r"<t[hd][^>]*>(.*?)<", versus_row(versus_page, "auroc")) == [
        "AUROC (ties count half)",
        "higher ↑",
        "+0.081 [+0.012, +0.150]",
    ]
    assert '<span class="verdict">probe better</span>' in versus_row(versus_page, "auroc")
    assert '<span class="verdict">baseline better</span>' in versus_row(versus_page, "brier")
    assert "lower ↓" in versus_row(versus_page, "brier")


def test_the_versus_table_colours_a_cell_by_its_verdict(versus_page: str) -> None:
    assert 'class="versus verdict-probe"' in versus_row(versus_page, "auroc")
    assert 'class="versus verdict-baseline"' in versus_row(versus_page, "brier")
    assert 'class="versus verdict-none"' in versus_row(versus_page, "smooth_ece")


def test_a_difference_that_rounds_to_zero_shows_no_minus_sign(versus_page: str) -> None:
    assert "+0.000 [—]" in versus_row(versus_page, "smooth_ece")
    assert (format_number(-0.0002), format_number(-0.0002, signed=True)) == ("0.000", "+0.000")


def test_a_page_without_baselines_has_no_versus_table(page: str) -> None:
    assert 'id="versus-baselines"' not in page and "Probe vs baselines" not in page


def test_legend_entries_go_in_as_many_columns_as_the_longest_fits() -> None:
    assert legend_columns(["base — ECE 0.1", "adapter — ECE 0.2", "adapter — ECE 0.3"]) == 3
    assert legend_columns(["x" * 60] * 4) == 2
    assert legend_columns(["x" * 200] * 2) == 1
    assert legend_columns(["probe"]) == 1


def test_caption_states_the_bootstrap_behind_the_intervals(page: str) -> None:
    assert "(95%, 1000 resamples, seed 0)" in page


def test_intervals_other_than_percentile_ones_are_marked_and_the_caption_says_how(page: str) -> None:
    assert table_cells(page, "ece")[1:3] == ["0.052 [0.031, 0.071] †", "0.098 [0.074, 0.121] ‡"]
    assert table_cells(page, "accuracy")[1] == "0.812 [0.776, 0.845]"
    assert "† BCa (bias-corrected and accelerated percentiles); ‡ basic (percentiles reflected about the value)" in page


def test_a_page_of_percentile_intervals_only_explains_no_marks() -> None:
    page = render_html("p", [("base", BASE | {"metrics": {"accuracy": BASE["metrics"]["accuracy"]}})])
    assert "except where marked" not in page and "†" not in page


def test_notes_appear_below_the_table(page: str) -> None:
    assert "<li>layer 16, last token</li>" in page


def test_every_caller_string_is_escaped() -> None:
    hostile_metrics = BASE["metrics"] | {"nll": {"value": 0.4, "interval": None, "label": HOSTILE}}
    hostile_versus = [(HOSTILE, {HOSTILE: {"value": 0.1, "interval": None, "label": HOSTILE, "verdict": HOSTILE}})]
    page = render_html(
        HOSTILE,
        [(HOSTILE, BASE | {"metrics": hostile_metrics})],
        differences={HOSTILE: {}},
        versus=hostile_versus,
        notes=[HOSTILE],
    )
    assert "<script" not in page
    assert page.count("&lt;script&gt;alert(1)&lt;/script&gt;") >= 10


# --- The module ----------------------------------------------------------------------------


def test_importing_the_module_loads_no_matplotlib_numpy_or_torch() -> None:
    probe = "import sys\nimport app.calibration.rendering\nprint(sorted(name for name in ('matplotlib', 'numpy', 'torch') if name in sys.modules))\n"
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


# --- In a browser ----------------------------------------------------------------------------


def run_headless_chromium(*arguments: str) -> subprocess.CompletedProcess[str]:
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    require(browser is not None, "Chromium is not installed (Debian package `chromium`)")
    assert browser
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run(
            [
                browser,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--no-first-run",
                "--disable-sync",
                f"--user-data-dir={profile}",
                *arguments,
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )


@pytest.mark.slow
def test_page_renders_its_table_and_diagram_in_headless_chromium(tmp_path: Path) -> None:
    page_path = tmp_path / "report.html"
    page_path.write_text(render_html("Probe p-1: base vs adapters", realistic_comparison()), encoding="utf-8")
    screenshot = tmp_path / "screenshot.png"

    dom = run_headless_chromium("--dump-dom", page_path.as_uri()).stdout
    run_headless_chromium(f"--screenshot={screenshot}", "--window-size=1280,1400", page_path.as_uri())

    table = re.search(r'<table id="metrics">.*?</table>', dom, re.DOTALL)
    assert table and re.findall(r'data-metric="([^"]+)"', table.group(0)) == [
        "n",
        "base_rate",
        "accuracy",
        "aurc",
        "brier",
        "ece",
    ]
    assert re.search(r'<figure id="reliability-diagram"><svg[ >]', dom)
    pixels = imread(str(screenshot))
    assert len(np.unique(pixels.reshape(-1, pixels.shape[-1]), axis=0)) > 16


if __name__ == "__main__":
    # The picture in the docs shows the service's own reports of the same predictions.
    from app.calibration.reporting import calibration_report

    service_reports = []
    for label, (seed, sharpness, shift) in SIMULATED.items():
        confidences, outcomes = simulated_predictions(seed, sharpness, shift)
        service_reports.append((label, calibration_report(outcomes, confidences).to_dict()))
    (ROOT / "docs" / "report-example.png").write_bytes(render_png(service_reports))
