"""A probe's card and its export (docs/concepts.md#exporting-a-probe): plain arrays and the
words to apply them with numpy, outside the service.

The probe folder holds the worker's own format (`workers/probes.py` `save_probe`):
`probe.safetensors` with the arrays under `probe.` and `recalibrator.`, and `probe.json` with
the scalars. The export renames them into one flat set of float64 arrays (scalars as 0-d
arrays) that the card's `formula` names, and puts the card itself, as JSON, in the
safetensors `__metadata__` under `card`.
"""

import json
from typing import Any

import numpy as np
from safetensors.numpy import load as load_arrays
from safetensors.numpy import save as save_arrays
from sqlalchemy.orm import Session

from app.registry.tables import Adapter, Dataset, Model, Probe, ProbeRun
from app.schemas.probes import (
    ProbeCard,
    ProbeCardAdapter,
    ProbeCardDataset,
    ProbeCardModel,
    ProbeCardSplit,
)
from app.storage import ArtifactStore

CARD_KEY = "card"
STORED_ARRAYS = "probe.safetensors"
STORED_PARAMS = "probe.json"

LAYER_CONVENTION = (
    "layer 0 is the embedding output (the input of block 0); layer i is the output of decoder block i, before the "
    "final norm for every layer (the Hugging Face hidden_states convention, except that its last entry is after the "
    "norm)"
)
TOKEN_POSITIONS = {
    "last": "the vector at the last real (non-padding) token",
    "mean": "the mean of the vectors over the real (non-padding) tokens",
}
PROMPT_FORMATS = {
    "raw": "the text as it is, tokenized with the tokenizer's own special tokens",
    "chat": "the text as the user turn of the tokenizer's chat template with its generation prompt "
    "(apply_chat_template(..., add_generation_prompt=True)), tokenized without adding special tokens again",
}

# What each exported array holds, by probe method and by recalibration.
PROBE_ARRAYS = {
    "logistic": {
        "mean": "(hidden_size,) mean of each feature on the training split",
        "scale": "(hidden_size,) standard deviation of each feature on the training split (1 where it is 0)",
        "coef": "(hidden_size,) weights on the standardised features",
        "intercept": "() bias of the logit",
    },
    "mass_mean": {
        "direction": "(hidden_size,) mean of the correct class minus mean of the incorrect one (whitened if the run "
        "asked for it)",
        "slope": "() scale of the projection onto direction",
        "bias": "() offset of the logit",
    },
}
RECALIBRATION_ARRAYS = {
    None: {},
    "temperature": {"temperature": "() the temperature the logit is divided by"},
    "platt": {"platt_a": "() slope on the logit", "platt_b": "() offset"},
    "isotonic": {
        "isotonic_x": "(k,) increasing logits, the knots of the isotonic map",
        "isotonic_y": "(k,) non-decreasing probabilities at those knots",
    },
}
LOGITS = {
    "logistic": "logit = sum(((h - mean) / scale) * coef) + intercept",
    "mass_mean": "logit = slope * sum(direction * h) + bias",
}
PROBABILITIES = {
    None: "P(correct) = 1 / (1 + exp(-logit))",
    "temperature": "P(correct) = 1 / (1 + exp(-logit / temperature))",
    "platt": "P(correct) = 1 / (1 + exp(-(platt_a * logit + platt_b)))",
    "isotonic": "P(correct) = numpy.interp(logit, isotonic_x, isotonic_y): linear between the knots "
    "(isotonic_x[i], isotonic_y[i]), the first and last isotonic_y beyond them",
}


def probe_card(session: Session, probe: Probe) -> ProbeCard:
    """The card of `probe`, from its registry row and those of its run, model, adapter and dataset."""
    run, model, dataset = (
        session.get(ProbeRun, probe.run_id),
        session.get(Model, probe.model_id),
        session.get(Dataset, probe.dataset_id),
    )
    assert run is not None and model is not None and dataset is not None  # foreign keys keep them
    adapter = session.get(Adapter, probe.adapter_id) if probe.adapter_id else None
    recalibration = probe.recalibration
    return ProbeCard(
        probe_id=probe.id,
        run_id=probe.run_id,
        method=probe.method,
        formula=(
            f"h is the hidden state (float64) described by hidden_state; {LOGITS[probe.method]}; "
            f"{PROBABILITIES[recalibration]}"
        ),
        arrays=PROBE_ARRAYS[probe.method] | RECALIBRATION_ARRAYS[recalibration],
        hidden_state=_hidden_state(probe),
        model=ProbeCardModel.model_validate(model, from_attributes=True),
        adapter=_card_adapter(probe.adapter_id, adapter),
        layer=probe.layer,
        layer_convention=LAYER_CONVENTION,
        token_position=probe.token_position,
        max_length=probe.max_length,
        prompt_format=probe.prompt_format,
        dataset=ProbeCardDataset.model_validate(dataset, from_attributes=True),
        split=ProbeCardSplit.model_validate(run.split),
        recalibration=recalibration,
        metrics=probe.metrics,
        created_at=probe.created_at,
    )


def _hidden_state(probe: Probe) -> str:
    """Which vector h is, in words: the input, the model, the layer and the token position."""
    given = PROMPT_FORMATS.get(probe.prompt_format, "the prompt_format template filled in, tokenized as raw")
    truncated = f", truncated to its first {probe.max_length} tokens" if probe.max_length is not None else ""
    runs = "the model with the adapter" if probe.adapter_id else "the model"
    return (
        f"the input is {given}{truncated}; {runs} reads it, and h is, at layer {probe.layer} "
        f"(layer_convention), {TOKEN_POSITIONS[probe.token_position]}"
    )


def _card_adapter(adapter_id: str | None, adapter: Adapter | None) -> ProbeCardAdapter | None:
    if adapter_id is None:
        return None
    if adapter is None:
        return ProbeCardAdapter(id=adapter_id, name=None, sha256=None, identity=None)
    return ProbeCardAdapter.model_validate(adapter, from_attributes=True)


def exported_arrays(artifacts: ArtifactStore, probe: Probe) -> dict[str, np.ndarray]:
    """The probe's arrays under the names its card gives them, read from its folder."""
    stored = load_arrays(artifacts.read_bytes(f"{probe.artifact}/{STORED_ARRAYS}"))
    params = json.loads(artifacts.read_bytes(f"{probe.artifact}/{STORED_PARAMS}"))
    fitted, recalibrator = params["probe"], params["recalibrator"]
    arrays: dict[str, Any]
    if fitted["kind"] == "logistic":
        arrays = {
            "mean": stored["probe.mean"],
            "scale": stored["probe.scale"],
            "coef": stored["probe.coef"],
            "intercept": fitted["intercept"],
        }
    else:
        arrays = {"direction": stored["probe.direction"], "slope": fitted["slope"], "bias": fitted["bias"]}
    kind = recalibrator["kind"] if recalibrator else None
    if kind == "temperature":
        arrays["temperature"] = recalibrator["temperature"]
    elif kind == "platt":
        arrays |= {"platt_a": recalibrator["a"], "platt_b": recalibrator["b"]}
    elif kind == "isotonic":
        arrays |= {"isotonic_x": stored["recalibrator.x_thresholds"], "isotonic_y": stored["recalibrator.y_thresholds"]}
    return {name: np.ascontiguousarray(value, dtype=np.float64) for name, value in arrays.items()}


def probe_export(session: Session, artifacts: ArtifactStore, probe: Probe) -> bytes:
    """The safetensors file of the probe's arrays, with its card in the metadata."""
    card = probe_card(session, probe).model_dump(mode="json")
    return save_arrays(exported_arrays(artifacts, probe), metadata={CARD_KEY: json.dumps(card)})
