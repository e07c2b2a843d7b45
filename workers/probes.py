"""Probes that read "is this answer correct" off hidden states, their recalibration, and
their storage (docs/concepts.md#probes).

Two probes, both scikit-learn estimators over features shaped (texts, hidden):

- `LogisticProbe`: L2-regularised logistic regression on standardised features, its
  strength chosen on the validation split by `fit_logistic_probe`.
- `MassMeanProbe`: the difference of class means, optionally whitened (Marks & Tegmark 2023).

Recalibration maps a probe's validation logits to better probabilities: `TemperatureScaling`
(Guo et al. 2017), `PlattScaling` (Platt 1999) or `IsotonicRecalibration` (Zadrozny & Elkan
2002). A probe is saved as plain arrays (safetensors) and JSON, never a pickle, so loading an
artifact cannot run code.
"""

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Self

import numpy as np
from safetensors.numpy import load_file, save_file
from scipy.optimize import minimize_scalar
from scipy.special import expit
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.covariance import LedoitWolf
from sklearn.isotonic import IsotonicRegression
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss
from sklearn.preprocessing import StandardScaler
from sklearn.utils import Tags
from sklearn.utils.multiclass import type_of_target
from sklearn.utils.validation import check_array, check_is_fitted, validate_data

from app.schemas.probes import Recalibration

DEFAULT_C_GRID = tuple(float(strength) for strength in np.logspace(-4, 2, 7))
DEFAULT_MAX_ITER = 1000
PROBE_ARRAYS = "probe.safetensors"
PROBE_PARAMS = "probe.json"
# only logits with no signal (T → ∞) or perfectly separated labels (T → 0) push the optimum past these
LOG_TEMPERATURE_BOUNDS = (np.log(1e-3), np.log(1e3))


def binary_classes(y: np.ndarray) -> np.ndarray:
    """The two sorted labels of a binary target; the wording of the refusals is scikit-learn's."""
    target_type = type_of_target(y, input_name="y", raise_unknown=True)
    if target_type != "binary":
        raise ValueError(f"Only binary classification is supported. The type of the target is {target_type}.")
    classes = np.unique(y)
    if len(classes) != 2:
        raise ValueError(f"a probe needs labels of two classes, got 1 class: {classes.tolist()}")
    return classes


class LogitClassifierMixin(ClassifierMixin):
    """Probabilities and predictions of a binary probe from its `decision_function` logits."""

    classes_: np.ndarray

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        return probabilities_of_both_classes(self.decision_function(X))

    def predict(self, X: np.ndarray) -> np.ndarray:
        is_positive = self.decision_function(X) > 0
        return self.classes_[is_positive.astype(np.int64)]


class LogisticProbe(LogitClassifierMixin, BaseEstimator):
    """L2-regularised logistic regression (lbfgs) on standardised features.

    `coef_` and `intercept_` live in the standardised space: logit = ((x − mean_) / scale_) · coef_
    + intercept_. A feature with zero variance gets scale 1, so it contributes nothing.
    `C` is scikit-learn's inverse regularisation strength.
    """

    def __init__(self, C: float = 1.0, max_iter: int = DEFAULT_MAX_ITER) -> None:
        self.C = C
        self.max_iter = max_iter

    def __sklearn_tags__(self) -> Tags:
        tags = super().__sklearn_tags__()
        tags.classifier_tags.multi_class = False
        return tags

    def fit(self, X: np.ndarray, y: np.ndarray) -> Self:
        X, y = validate_data(self, X, y, dtype=[np.float64, np.float32])
        binary_classes(y)
        scaler = StandardScaler().fit(X)
        model = LogisticRegression(C=self.C, max_iter=self.max_iter).fit(scaler.transform(X), y)
        return self.adopt(scaler, model)

    def adopt(self, scaler: StandardScaler, model: LogisticRegression) -> Self:
        """Take the learned state of a scaler and a binary logistic regression fitted after it."""
        self.mean_ = scaler.mean_.astype(np.float64)
        self.scale_ = scaler.scale_.astype(np.float64)
        self.coef_ = model.coef_[0].astype(np.float64)
        self.intercept_ = float(model.intercept_[0])
        self.classes_ = model.classes_
        self.n_iter_ = int(model.n_iter_[0])
        self.n_features_in_ = len(self.coef_)
        return self

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, dtype=np.float64)
        return ((X - self.mean_) / self.scale_) @ self.coef_ + self.intercept_

    def to_state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        check_is_fitted(self)
        arrays = {"mean": self.mean_, "scale": self.scale_, "coef": self.coef_, "classes": self.classes_}
        return arrays, {
            "kind": "logistic",
            "C": float(self.C),
            "max_iter": int(self.max_iter),
            "intercept": self.intercept_,
            "n_iter": self.n_iter_,
        }

    @classmethod
    def from_state(cls, arrays: dict[str, np.ndarray], params: dict[str, Any]) -> "LogisticProbe":
        probe = cls(C=params["C"], max_iter=params["max_iter"])
        probe.mean_, probe.scale_, probe.coef_ = arrays["mean"], arrays["scale"], arrays["coef"]
        probe.intercept_, probe.n_iter_ = params["intercept"], params["n_iter"]
        probe.classes_ = arrays["classes"]
        probe.n_features_in_ = len(probe.coef_)
        return probe


def fit_logistic_probe(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    *,
    grid: Sequence[float] = DEFAULT_C_GRID,
) -> tuple[LogisticProbe, dict[str, Any]]:
    """A `LogisticProbe` fitted on the training split, its C chosen on the validation split.

    The chosen C has the lowest validation log loss; a tie goes to the stronger
    regularisation (smaller C). The features are standardised once, and the fits run along
    the grid from strong to weak regularisation, each starting from the previous solution.
    They run on float32 features: standardised values need no more precision, and it halves
    the memory traffic that dominates lbfgs on wide features.
    """
    x_train = check_array(x_train, dtype=[np.float64, np.float32])
    binary_classes(np.asarray(y_train))
    scaler = StandardScaler().fit(x_train)
    standardised_train = scaler.transform(x_train).astype(np.float32, copy=False)
    path = LogisticRegression(warm_start=True, max_iter=DEFAULT_MAX_ITER)
    best: LogisticProbe | None = None
    losses: dict[str, float] = {}
    for strength in sorted(float(value) for value in grid):
        path.set_params(C=strength).fit(standardised_train, y_train)
        probe = LogisticProbe(C=strength).adopt(scaler, path)
        losses[str(strength)] = float(log_loss(y_val, probe.predict_proba(x_val), labels=probe.classes_))
        if best is None or losses[str(strength)] < losses[str(best.C)]:
            best = probe
    if best is None:
        raise ValueError("the grid of C values is empty")
    return best, {"chosen_C": best.C, "validation_log_loss": losses}


class MassMeanProbe(LogitClassifierMixin, BaseEstimator):
    """Mass-mean probe: the direction from the mean of class 0 to the mean of class 1.

    Marks & Tegmark (2023), "The Geometry of Truth: Emergent Linear Structure in Large
    Language Model Representations of True/False Datasets", arXiv:2310.06824. With
    `whiten=True` the direction is Σ⁻¹(mu1_ − mu0_), Σ the covariance of the class-centred
    features (their "IID" variant), estimated with Ledoit–Wolf shrinkage so it is invertible
    when features outnumber texts.

    The paper reads σ(direction · x) as the probability; here a 1-D logistic fit on the
    training projections (logit = slope_ · (direction_ · x) + bias_) sets the scale and the
    offset so that `predict_proba` is a probability worth scoring.
    """

    def __init__(self, whiten: bool = False) -> None:
        self.whiten = whiten

    def __sklearn_tags__(self) -> Tags:
        tags = super().__sklearn_tags__()
        tags.classifier_tags.multi_class = False
        return tags

    def fit(self, X: np.ndarray, y: np.ndarray) -> Self:
        X, y = validate_data(self, X, y, dtype=np.float64)
        self.classes_ = binary_classes(y)
        is_positive = y == self.classes_[1]
        self.mu0_ = X[~is_positive].mean(axis=0)
        self.mu1_ = X[is_positive].mean(axis=0)
        difference = self.mu1_ - self.mu0_
        if self.whiten:
            centred = X - np.where(is_positive[:, None], self.mu1_, self.mu0_)
            # the precision matrix LedoitWolf would store costs an eigendecomposition; a solve suffices
            covariance = LedoitWolf(store_precision=False).fit(centred).covariance_
            self.direction_ = np.linalg.solve(covariance, difference)
        else:
            self.direction_ = difference
        self.slope_, self.bias_ = logistic_fit_of_projections(X @ self.direction_, is_positive)
        return self

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, dtype=np.float64)
        return self.slope_ * (X @ self.direction_) + self.bias_

    def to_state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        check_is_fitted(self)
        arrays = {"mu0": self.mu0_, "mu1": self.mu1_, "direction": self.direction_, "classes": self.classes_}
        return arrays, {"kind": "mass_mean", "whiten": bool(self.whiten), "slope": self.slope_, "bias": self.bias_}

    @classmethod
    def from_state(cls, arrays: dict[str, np.ndarray], params: dict[str, Any]) -> "MassMeanProbe":
        probe = cls(whiten=params["whiten"])
        probe.mu0_, probe.mu1_, probe.direction_ = arrays["mu0"], arrays["mu1"], arrays["direction"]
        probe.classes_ = arrays["classes"]
        probe.slope_, probe.bias_ = params["slope"], params["bias"]
        probe.n_features_in_ = len(probe.direction_)
        return probe


def logistic_fit_of_projections(projections: np.ndarray, is_positive: np.ndarray) -> tuple[float, float]:
    """Slope and bias of a logistic regression of the label on a 1-D projection.

    Training projections are often perfectly separable (more features than texts), where an
    unpenalised fit has no finite solution; scikit-learn's default mild L2 penalty, applied to
    the standardised projection, keeps the slope finite and barely matters otherwise.
    """
    centre, spread = projections.mean(), projections.std()
    spread = spread if spread > 0 else 1.0
    model = LogisticRegression().fit(((projections - centre) / spread)[:, None], is_positive)
    slope = float(model.coef_[0, 0]) / spread
    return slope, float(model.intercept_[0]) - slope * centre


def probabilities_of_both_classes(logits: np.ndarray) -> np.ndarray:
    positive = expit(logits)
    return np.column_stack([1.0 - positive, positive])


def binary_negative_log_likelihood(logits: np.ndarray, y: np.ndarray) -> float:
    """Mean −log p(y | sigmoid(logit)), computed without forming the probabilities."""
    return float(np.mean(np.logaddexp(0.0, logits) - y * logits))


def zero_one_labels(logits: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(y)
    if logits.ndim != 1 or labels.shape != logits.shape:
        raise ValueError(
            f"logits and labels must be one-dimensional and of one length, got shapes {logits.shape} and {labels.shape}"
        )
    if not np.isin(labels, (0, 1)).all():
        raise ValueError("recalibration labels must be 0 or 1")
    return logits, labels.astype(np.float64)


class TemperatureScaling(BaseEstimator):
    """P(y=1) = sigmoid(logit / temperature_), the temperature minimising validation NLL.

    Guo, Pleiss, Sun & Weinberger (2017), "On Calibration of Modern Neural Networks", ICML,
    in its binary form. The search runs on log T, which keeps T positive.
    """

    kind: ClassVar[Recalibration] = "temperature"

    def fit(self, logits: np.ndarray, y: np.ndarray) -> Self:
        logits, labels = zero_one_labels(logits, y)
        result = minimize_scalar(
            lambda log_temperature: binary_negative_log_likelihood(logits / np.exp(log_temperature), labels),
            bounds=LOG_TEMPERATURE_BOUNDS,
            method="bounded",
            options={"xatol": 1e-8},
        )
        self.temperature_ = float(np.exp(result.x))
        return self

    def transform(self, logits: np.ndarray) -> np.ndarray:
        check_is_fitted(self)
        return expit(np.asarray(logits, dtype=np.float64) / self.temperature_)

    def to_state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        check_is_fitted(self)
        return {}, {"kind": self.kind, "temperature": self.temperature_}

    @classmethod
    def from_state(cls, arrays: dict[str, np.ndarray], params: dict[str, Any]) -> "TemperatureScaling":
        scaling = cls()
        scaling.temperature_ = params["temperature"]
        return scaling


class PlattScaling(BaseEstimator):
    """P(y=1) = sigmoid(a_ · logit + b_), fitted by unpenalised logistic regression on the logit.

    Platt (1999), "Probabilistic Outputs for Support Vector Machines and Comparisons to
    Regularized Likelihood Methods". Targets are the 0/1 labels themselves, not Platt's
    smoothed targets.
    """

    kind: ClassVar[Recalibration] = "platt"

    def fit(self, logits: np.ndarray, y: np.ndarray) -> Self:
        logits, labels = zero_one_labels(logits, y)
        model = LogisticRegression(C=np.inf, tol=1e-10, max_iter=10_000).fit(logits[:, None], labels)
        self.a_ = float(model.coef_[0, 0])
        self.b_ = float(model.intercept_[0])
        return self

    def transform(self, logits: np.ndarray) -> np.ndarray:
        check_is_fitted(self)
        return expit(self.a_ * np.asarray(logits, dtype=np.float64) + self.b_)

    def to_state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        check_is_fitted(self)
        return {}, {"kind": self.kind, "a": self.a_, "b": self.b_}

    @classmethod
    def from_state(cls, arrays: dict[str, np.ndarray], params: dict[str, Any]) -> "PlattScaling":
        scaling = cls()
        scaling.a_, scaling.b_ = params["a"], params["b"]
        return scaling


class IsotonicRecalibration(BaseEstimator):
    """P(y=1) = the non-decreasing function of the logit closest in squared error to the 0/1
    validation labels at the validation logits (pool adjacent violators), linear between them.

    Zadrozny & Elkan (2002), "Transforming Classifier Scores into Accurate Multiclass
    Probability Estimates", KDD. The fit is scikit-learn's `IsotonicRegression(out_of_bounds=
    "clip", y_min=0, y_max=1)`; only its thresholds are kept (`x_thresholds_`, increasing
    logits, and `y_thresholds_`, their probabilities), and a logit maps to
    `numpy.interp(logit, x_thresholds_, y_thresholds_)`: the end values beyond the ends, as
    `clip` gives. Unlike the two sigmoid maps it can reach exactly 0 and 1, and it ties the
    logits of a step, which can lower AUROC.
    """

    kind: ClassVar[Recalibration] = "isotonic"

    def fit(self, logits: np.ndarray, y: np.ndarray) -> Self:
        logits, labels = zero_one_labels(logits, y)
        model = IsotonicRegression(out_of_bounds="clip", y_min=0, y_max=1, increasing=True).fit(logits, labels)
        self.x_thresholds_ = np.asarray(model.X_thresholds_, dtype=np.float64)
        self.y_thresholds_ = np.asarray(model.y_thresholds_, dtype=np.float64)
        return self

    def transform(self, logits: np.ndarray) -> np.ndarray:
        check_is_fitted(self)
        return np.interp(np.asarray(logits, dtype=np.float64), self.x_thresholds_, self.y_thresholds_)

    def to_state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        check_is_fitted(self)
        return {"x_thresholds": self.x_thresholds_, "y_thresholds": self.y_thresholds_}, {"kind": self.kind}

    @classmethod
    def from_state(cls, arrays: dict[str, np.ndarray], params: dict[str, Any]) -> "IsotonicRecalibration":
        recalibration = cls()
        recalibration.x_thresholds_, recalibration.y_thresholds_ = arrays["x_thresholds"], arrays["y_thresholds"]
        return recalibration


Probe = LogisticProbe | MassMeanProbe
Recalibrator = TemperatureScaling | PlattScaling | IsotonicRecalibration
PROBE_KINDS: dict[str, type[Probe]] = {"logistic": LogisticProbe, "mass_mean": MassMeanProbe}
RECALIBRATOR_KINDS: dict[str, type[Recalibrator]] = {
    recalibrator.kind: recalibrator for recalibrator in (TemperatureScaling, PlattScaling, IsotonicRecalibration)
}


def probe_from_state(arrays: dict[str, np.ndarray], params: dict[str, Any]) -> Probe:
    if params.get("kind") not in PROBE_KINDS:
        raise ValueError(f"unknown probe kind {params.get('kind')!r}; known: {sorted(PROBE_KINDS)}")
    return PROBE_KINDS[params["kind"]].from_state(arrays, params)


def recalibrator_from_state(arrays: dict[str, np.ndarray], params: dict[str, Any]) -> Recalibrator:
    if params.get("kind") not in RECALIBRATOR_KINDS:
        raise ValueError(f"unknown recalibrator kind {params.get('kind')!r}; known: {sorted(RECALIBRATOR_KINDS)}")
    return RECALIBRATOR_KINDS[params["kind"]].from_state(arrays, params)


def save_probe(folder: Path, probe: Probe, recalibrator: Recalibrator | None) -> None:
    """Write `probe.safetensors` (the arrays) and `probe.json` (everything else) into `folder`;
    the gateway's export (`app/registry/probe_cards.py`) reads this layout.

    Each file is written beside its final name and renamed into place, so a reader never
    sees half a file.
    """
    probe_arrays, probe_params = probe.to_state()
    recalibrator_arrays, recalibrator_params = recalibrator.to_state() if recalibrator is not None else ({}, None)
    arrays = {f"probe.{name}": array for name, array in probe_arrays.items()}
    arrays |= {f"recalibrator.{name}": array for name, array in recalibrator_arrays.items()}
    params = {"probe": probe_params, "recalibrator": recalibrator_params}
    folder.mkdir(parents=True, exist_ok=True)
    save_file({name: np.ascontiguousarray(array) for name, array in arrays.items()}, folder / f"{PROBE_ARRAYS}.partial")
    (folder / f"{PROBE_PARAMS}.partial").write_text(json.dumps(params, indent=2))
    os.replace(folder / f"{PROBE_ARRAYS}.partial", folder / PROBE_ARRAYS)
    os.replace(folder / f"{PROBE_PARAMS}.partial", folder / PROBE_PARAMS)


def load_probe(folder: Path) -> tuple[Probe, Recalibrator | None]:
    arrays = load_file(folder / PROBE_ARRAYS)
    params = json.loads((folder / PROBE_PARAMS).read_text())
    probe = probe_from_state(arrays_under(arrays, "probe."), params["probe"])
    if params["recalibrator"] is None:
        return probe, None
    return probe, recalibrator_from_state(arrays_under(arrays, "recalibrator."), params["recalibrator"])


def arrays_under(arrays: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    return {name.removeprefix(prefix): array for name, array in arrays.items() if name.startswith(prefix)}


def probability_of_correct(probe: Probe, recalibrator: Recalibrator | None, X: np.ndarray) -> np.ndarray:
    """P(y = 1) for each row of `X` (the second of the probe's sorted classes), recalibrated
    from the probe's logits when a recalibrator is given."""
    if recalibrator is None:
        return probe.predict_proba(X)[:, 1]
    return recalibrator.transform(probe.decision_function(X))
