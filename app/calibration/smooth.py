"""Smooth ECE (Błasiok & Nakkiran 2023, "Smooth ECE: Principled reliability diagrams via
kernel smoothing"): the reflected Gaussian kernel applied on a fine grid by FFT, at the
self-consistent bandwidth found by bisection."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import numpy.typing as npt

from app.calibration.inputs import checked
from app.calibration.values import Estimator, SmoothCalibrationError

# Smooth ECE: the kernel acts on a grid of this many cells over [0, 1] (a cell is 6.1e-5,
# a sixteenth of the smallest bandwidth); bandwidths below that floor are not resolved
# (the floor `relplot.smECE` also uses); the bandwidth search stops at this width.
SMOOTH_GRID_CELLS = 2**14
SMALLEST_BANDWIDTH = 1e-3
BANDWIDTH_TOLERANCE = 1e-7
# Periodic images of the reflected kernel that matter up to σ = 1 (the next adds < 1e-10).
KERNEL_IMAGES = range(-4, 5)


def smooth_ece(y: npt.ArrayLike, p: npt.ArrayLike) -> SmoothCalibrationError:
    labels, probabilities = checked(y, p)
    residual_spectrum = _reflected_spectrum(_grid_masses(probabilities, probabilities - labels))
    density_spectrum = _reflected_spectrum(_grid_masses(probabilities, np.ones_like(probabilities)))

    def smooth_ece_at(bandwidth: float) -> float:
        kernel_spectrum = np.fft.rfft(_periodic_kernel(bandwidth))
        residual = _on_unit_interval(residual_spectrum * kernel_spectrum)
        density = _on_unit_interval(density_spectrum * kernel_spectrum)
        # The ratio of two trapezoid integrals: the density integrates to 1 exactly, so
        # dividing by its discrete integral cancels the kernel's discretisation error.
        return float(_trapezoid(np.abs(residual)) / _trapezoid(density))

    bandwidth = _self_consistent_bandwidth(smooth_ece_at)
    estimator = Estimator("smooth_ece", None, "kernel", "l1", "binary")
    return SmoothCalibrationError(smooth_ece_at(bandwidth), bandwidth, estimator)


def _grid_masses(positions: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Each weight split between the two grid nodes around its position, in proportion
    to nearness, on `SMOOTH_GRID_CELLS + 1` nodes over [0, 1]."""
    scaled = positions * SMOOTH_GRID_CELLS
    left = np.minimum(np.floor(scaled).astype(np.intp), SMOOTH_GRID_CELLS - 1)
    right_share = scaled - left
    nodes = SMOOTH_GRID_CELLS + 1
    return np.bincount(left, weights=(1.0 - right_share) * weights, minlength=nodes) + np.bincount(
        left + 1, weights=right_share * weights, minlength=nodes
    )


def _reflected_spectrum(masses: np.ndarray) -> np.ndarray:
    """The Fourier transform of the masses mirrored about 0 and 1 into one period [-1, 1)
    of an even, 2-periodic sequence: convolving it with a periodic Gaussian is smoothing
    with the reflected kernel. A mass on an end node is its own mirror image, so it counts
    twice (the reflected kernel at x = 0 is 2·φ(t))."""
    mirrored = np.concatenate([masses, masses[-2:0:-1]])
    mirrored[0] *= 2.0
    mirrored[SMOOTH_GRID_CELLS] *= 2.0
    return np.fft.rfft(mirrored)


def _periodic_kernel(bandwidth: float) -> np.ndarray:
    """The Gaussian density of width `bandwidth`, summed over its period-2 images, at the
    grid's offsets around one period."""
    period_nodes = 2 * SMOOTH_GRID_CELLS
    offsets = np.arange(period_nodes) / SMOOTH_GRID_CELLS
    images = offsets[None, :] + 2.0 * np.array(KERNEL_IMAGES)[:, None]
    return np.exp(-0.5 * (images / bandwidth) ** 2).sum(axis=0) / (math.sqrt(2.0 * math.pi) * bandwidth)


def _on_unit_interval(spectrum: np.ndarray) -> np.ndarray:
    return np.fft.irfft(spectrum, n=2 * SMOOTH_GRID_CELLS)[: SMOOTH_GRID_CELLS + 1]


def _trapezoid(values: np.ndarray) -> float:
    return float(values.sum() - 0.5 * (values[0] + values[-1]))


def _self_consistent_bandwidth(smooth_ece_at: Callable[[float], float]) -> float:
    """The σ* with smECE_σ* = σ*. smECE_σ falls as σ grows, so smECE_σ − σ changes sign
    once in [floor, 1]; bisection keeps the upper end, where smECE_σ ≤ σ."""
    low, high = SMALLEST_BANDWIDTH, 1.0
    if smooth_ece_at(low) <= low:
        return low
    while high - low > BANDWIDTH_TOLERANCE:
        middle = 0.5 * (low + high)
        if smooth_ece_at(middle) > middle:
            low = middle
        else:
            high = middle
    return high
