"""Tinker or PEFT LoRA checkpoints → a PEFT adapter checked against its base model.

Tinker stores `base_model.model.<HF module path>.lora_A.weight` (r, in) and `.lora_B.weight`
(out, r), unscaled, with the update `W + (B @ A) * lora_alpha / r` — PEFT's own layout for
linear layers, so those tensors keep their names. What changes:

- the unembedding LoRA (`…model.unembed_tokens`, or `…model.lm_head`) goes on `lm_head`
  when the base has its own `lm_head.weight`; when the base ties its embeddings it goes on
  the embedding matrix, as PEFT's `lora_embedding_A` (r, vocab) = Bᵀ and `lora_embedding_B`
  (hidden, r) = Aᵀ — a plain `lora_A/B` key there would be dropped by PEFT without a word;
- GPT-OSS names attention `.attn`, the Hugging Face model `.self_attn`;
- MoE expert tensors (3-D, `…experts.w1|w2|w3`) have no PEFT equivalent and are refused.

Every mapped tensor must name a module of the base with matching shapes; the first
mismatches are reported and nothing is written.

The user's adapter_config.json is hostile input too: the values the converted adapter keeps
(r, lora_alpha, use_rslora) are checked for type and range, NaN and infinities are refused,
and a setting that would make the adapter compute something else than a plain LoRA update
(DoRA, biases, patterns, extra trained modules…) is refused rather than silently dropped.
"""

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.inputs.user_files import (
    METADATA_MAX_BYTES,
    FileTooLarge,
    NotARegularFile,
    read_regular_file,
)
from app.registry.adapters import PUBLISHED_DEFAULTS, adapter_identity
from app.registry.tables import Model
from workers.adapters.safetensors_stream import OutputTensor, read_index, write
from workers.errors import JobFailed
from workers.safetensors_header import InvalidSafetensors, StoredTensor

PREFIX = "base_model.model."
LINEAR_SUFFIXES = {".lora_A.weight": "A", ".lora_B.weight": "B"}
EMBEDDING_SUFFIXES = {".lora_embedding_A": "A", ".lora_embedding_B": "B"}
TINKER_UNEMBED_PATHS = ("model.unembed_tokens", "model.lm_head")  # PEFT's own top-level `lm_head` keeps its place
MOE_EXPERT = re.compile(r"\.experts\.(w1|w2|w3)$|\.experts$")
MAX_REPORTED = 5
CONFIG_MAX_BYTES = METADATA_MAX_BYTES
MAX_LORA_RANK = 16384
MAX_LORA_ALPHA = 1e6
# Settings that change what a LoRA adapter computes but that this conversion does not carry
# into the PEFT adapter it writes: an adapter using any of them is refused, never applied
# differently from how it was trained. Each maps to the values that mean "not used".
UNSUPPORTED_SETTINGS: dict[str, tuple[Any, ...]] = {
    "use_dora": (None, False),
    "fan_in_fan_out": (None, False),
    "bias": (None, "none"),
    "modules_to_save": (None, []),
    "rank_pattern": (None, {}),
    "alpha_pattern": (None, {}),
    "layers_to_transform": (None, []),
    "layer_replication": (None, []),
    "trainable_token_indices": (None, [], {}),
    "target_parameters": (None, []),
    "lora_bias": (None, False),
    "use_qalora": (None, False),
}


@dataclass(frozen=True)
class BaseModules:
    """What the base model offers LoRA: each linear's (out, in) and each embedding's
    (vocab, hidden), by module path; and whether the LM head shares the embedding."""

    linears: dict[str, tuple[int, int]]
    embeddings: dict[str, tuple[int, int]]
    input_embedding: str
    tied_embeddings: bool


@dataclass
class ConvertedAdapter:
    config: dict[str, Any]
    sha256: str
    identity: str
    """The weights' sha256 and the config values that change the adapter's output, hashed:
    two adapters are the same only when this is."""
    size_bytes: int
    r: int
    lora_alpha: float
    target_modules: list[str]
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class LoraSettings:
    """What of a user's adapter_config.json the converted adapter keeps, checked."""

    r: int | None
    lora_alpha: float
    use_rslora: bool


def _split_key(key: str) -> tuple[str, str, bool]:
    """(module path, "A"|"B", is_embedding_key) of a LoRA tensor name."""
    if not key.startswith(PREFIX):
        raise JobFailed(
            "unsupported_adapter",
            f"tensor {key!r} is not a LoRA weight (expected names starting {PREFIX!r})",
            tensor=key,
        )
    body = key[len(PREFIX) :]
    for suffixes, is_embedding in ((LINEAR_SUFFIXES, False), (EMBEDDING_SUFFIXES, True)):
        for suffix, side in suffixes.items():
            if body.endswith(suffix):
                return body[: -len(suffix)], side, is_embedding
    raise JobFailed("unsupported_adapter", f"tensor {key!r} is neither lora_A nor lora_B", tensor=key)


def _target(path: str, base: BaseModules) -> tuple[str, bool, str | None]:
    """(module path in the base, goes on an embedding, note) for a checkpoint module path."""
    if path in TINKER_UNEMBED_PATHS:
        if not base.tied_embeddings and "lm_head" in base.linears:
            return "lm_head", False, None
        return (
            base.input_embedding,
            True,
            "the unembedding LoRA went onto the tied input embedding as lora_embedding_A/B",
        )
    if ".attn." in f"{path}." and path.replace(".attn", ".self_attn") in base.linears:
        return path.replace(".attn", ".self_attn"), False, "GPT-OSS `.attn` names became `.self_attn`"
    return path, path in base.embeddings, None


def _expected_shape(module: tuple[int, int], side: str, on_embedding: bool, r: int) -> tuple[int, int]:
    if on_embedding:  # PEFT: lora_embedding_A (r, vocab), lora_embedding_B (hidden, r)
        vocab, hidden = module
        return (r, vocab) if side == "A" else (hidden, r)
    out_features, in_features = module
    return (r, in_features) if side == "A" else (out_features, r)


def _rank(tensors: dict[str, StoredTensor]) -> int:
    ranks = {
        t.shape[0] if side == "A" else t.shape[-1]
        for key, t in tensors.items()
        for _, side, _ in [_split_key(key)]
        if len(t.shape) == 2
    }
    if len(ranks) != 1:
        raise JobFailed(
            "unsupported_adapter", f"the LoRA tensors disagree on their rank: {sorted(ranks)}", ranks=sorted(ranks)
        )
    rank = ranks.pop()
    if not 1 <= rank <= MAX_LORA_RANK:
        raise JobFailed(
            "unsupported_adapter",
            f"the LoRA tensors have rank {rank}; ranks from 1 to {MAX_LORA_RANK} are accepted",
            rank=rank,
        )
    return rank


def plan(tensors: dict[str, StoredTensor], base: BaseModules) -> tuple[list[OutputTensor], int, list[str], list[str]]:
    """The output tensors, the rank, the target module names, and notes."""
    experts = [key for key in tensors if MOE_EXPERT.search(_split_key(key)[0])]
    if experts:
        raise JobFailed(
            "unsupported_adapter",
            f"MoE expert LoRA tensors cannot be converted to PEFT: {', '.join(experts[:MAX_REPORTED])}",
            tensors=experts[:MAX_REPORTED],
        )
    not_matrices = [
        f"{key} ({len(tensor.shape)} dimensions)" for key, tensor in tensors.items() if len(tensor.shape) != 2
    ]
    if not_matrices:
        raise JobFailed(
            "unsupported_adapter",
            f"LoRA weights are matrices, and these tensors are not: {', '.join(not_matrices[:MAX_REPORTED])}",
        )
    r = _rank(tensors)
    outputs: list[OutputTensor] = []
    targets: set[str] = set()
    notes: set[str] = set()
    mismatches: list[dict[str, Any]] = []
    for key, stored in sorted(tensors.items()):
        path, side, stored_as_embedding = _split_key(key)
        target, on_embedding, note = _target(path, base)
        if note:
            notes.add(note)
        module = (base.embeddings if on_embedding else base.linears).get(target)
        if module is None:
            mismatches.append(
                {
                    "tensor": key,
                    "problem": f"the base model has no {'embedding' if on_embedding else 'linear'} module {target!r}",
                }
            )
            continue
        # Tinker's unembedding tensors (linear layout) are transposed onto the embedding.
        transpose = on_embedding and not stored_as_embedding
        output_side = ("B" if side == "A" else "A") if transpose else side
        shape = tuple(reversed(stored.shape)) if transpose else stored.shape
        expected = _expected_shape(module, output_side, on_embedding, r)
        if shape != expected:
            mismatches.append(
                {
                    "tensor": key,
                    "problem": f"shape {list(stored.shape)} does not fit {target!r} (expected {list(expected)})",
                }
            )
            continue
        suffix = f".lora_embedding_{output_side}" if on_embedding else f".lora_{output_side}.weight"
        outputs.append(OutputTensor(name=f"{PREFIX}{target}{suffix}", source=stored, transpose=transpose))
        targets.add(target.rsplit(".", 1)[-1])
    if mismatches:
        shown = "; ".join(f"{m['tensor']}: {m['problem']}" for m in mismatches[:MAX_REPORTED])
        raise JobFailed(
            "adapter_base_mismatch",
            f"{len(mismatches)} tensors do not fit the base model — {shown}",
            mismatches=mismatches[:MAX_REPORTED],
        )
    return sorted(outputs, key=lambda o: o.name), r, sorted(targets), sorted(notes)


class _NonFiniteNumber(ValueError):
    pass


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999 parses as infinity
        raise _NonFiniteNumber(f"the number {text[:40]} is out of range")
    return value


def _refuse_constant(name: str) -> float:
    raise _NonFiniteNumber(f"{name} is not a number JSON allows")


def read_config(path: Path) -> dict[str, Any]:
    """adapter_config.json as a JSON object: read only if it is a regular file of at most
    `CONFIG_MAX_BYTES`, with NaN, Infinity and out-of-range numbers refused (Python's json
    accepts them; the adapter's scale must be a real number)."""
    try:
        raw = read_regular_file(path, CONFIG_MAX_BYTES)
    except NotARegularFile as exc:
        raise JobFailed("unsupported_adapter", f"adapter_config.json is a {exc.kind}, not a regular file") from exc
    except FileTooLarge as exc:
        raise JobFailed("too_large", f"adapter_config.json is larger than {CONFIG_MAX_BYTES} bytes") from exc
    try:
        config = json.loads(raw.decode("utf-8"), parse_constant=_refuse_constant, parse_float=_finite_float)
    except _NonFiniteNumber as exc:
        raise JobFailed("unsupported_adapter", f"adapter_config.json: {exc}") from exc
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise JobFailed("unsupported_adapter", f"adapter_config.json is not valid JSON: {str(exc)[:200]}") from exc
    if not isinstance(config, dict):
        raise JobFailed("unsupported_adapter", f"adapter_config.json is a JSON {_json_type(config)}, not an object")
    if config.get("peft_type", "LORA") != "LORA":
        raise JobFailed("unsupported_adapter", f"only LoRA adapters are supported, not {_shown(config['peft_type'])}")
    return config


def lora_settings(config: dict[str, Any]) -> LoraSettings:
    """The values of `config` the converted adapter keeps, each checked for type and range;
    settings this conversion cannot carry are refused. Raises `JobFailed`
    (`unsupported_adapter`) naming the setting and the value."""
    for name, unused in UNSUPPORTED_SETTINGS.items():
        if name in config and not any(type(config[name]) is type(value) and config[name] == value for value in unused):
            raise JobFailed(
                "unsupported_adapter",
                f"adapter_config.json sets {name}={_shown(config[name])}, which changes what the adapter computes and which this service "
                "cannot apply; only plain LoRA adapters are imported",
                setting=name,
            )
    r = config.get("r")
    if r is not None and not (_is_whole(r) and 1 <= r <= MAX_LORA_RANK):
        raise _bad_setting("r", r, f"a whole number from 1 to {MAX_LORA_RANK}")
    if "lora_alpha" not in config:
        raise JobFailed(
            "unsupported_adapter",
            "adapter_config.json lacks lora_alpha, and the scale of a LoRA update cannot be read from its tensors",
        )
    alpha = config["lora_alpha"]
    if not (_is_number(alpha) and 0 < alpha <= MAX_LORA_ALPHA):
        raise _bad_setting("lora_alpha", alpha, f"a number greater than 0 and at most {MAX_LORA_ALPHA:g}")
    dropout = config.get("lora_dropout")
    if dropout is not None and not (_is_number(dropout) and 0 <= dropout < 1):
        raise _bad_setting("lora_dropout", dropout, "a number from 0 up to (not including) 1")
    use_rslora = config.get("use_rslora")
    if use_rslora is not None and not isinstance(use_rslora, bool):
        raise _bad_setting("use_rslora", use_rslora, "true or false")
    target_modules = config.get("target_modules")
    if (
        target_modules is not None
        and not isinstance(target_modules, str)
        and not (isinstance(target_modules, list) and all(isinstance(name, str) for name in target_modules))
    ):
        raise _bad_setting("target_modules", target_modules, "a list of module names, or one pattern")
    return LoraSettings(r=r, lora_alpha=float(alpha), use_rslora=bool(use_rslora))


def _is_whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _bad_setting(name: str, value: Any, wanted: str) -> JobFailed:
    return JobFailed(
        "unsupported_adapter", f"adapter_config.json: {name} must be {wanted}, not {_shown(value)}", setting=name
    )


def _shown(value: Any) -> str:
    """A user's value in a message, cut short."""
    text = json.dumps(value) if not isinstance(value, float) or math.isfinite(value) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _json_type(value: Any) -> str:
    return {list: "array", str: "string", int: "number", float: "number", bool: "boolean", type(None): "null"}.get(
        type(value), "value"
    )


def convert(
    source: Path, config: dict[str, Any], base: BaseModules, destination: Path, base_model_source: str
) -> ConvertedAdapter:
    """Write `adapter_model.safetensors` and a complete `adapter_config.json` into
    `destination` (an existing empty folder)."""
    settings = lora_settings(config)  # before anything is written
    try:
        tensors, metadata = read_index(source)
    except InvalidSafetensors as exc:
        raise JobFailed("invalid_weights", str(exc)) from exc
    if not tensors:
        raise JobFailed("unsupported_adapter", f"{source.name} holds no tensors")
    outputs, r, target_modules, notes = plan(tensors, base)
    if settings.r is not None and settings.r != r:
        raise JobFailed("unsupported_adapter", f"adapter_config.json says r={settings.r}, the tensors have rank {r}")
    lora_alpha = settings.lora_alpha
    try:
        sha256 = write(source, outputs, destination / "adapter_model.safetensors", metadata | {"format": "pt"})
    except InvalidSafetensors as exc:
        raise JobFailed("invalid_weights", str(exc)) from exc
    peft_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_source,
        "r": r,
        "lora_alpha": lora_alpha,
        "target_modules": target_modules,
        "lora_dropout": 0.0,
        **PUBLISHED_DEFAULTS,
        "use_rslora": settings.use_rslora,
        "inference_mode": True,
    }
    (destination / "adapter_config.json").write_text(json.dumps(peft_config, indent=2, allow_nan=False))
    return ConvertedAdapter(
        config=peft_config,
        sha256=sha256,
        identity=adapter_identity(sha256, peft_config),
        size_bytes=(destination / "adapter_model.safetensors").stat().st_size,
        r=r,
        lora_alpha=lora_alpha,
        target_modules=target_modules,
        notes=notes,
    )


def base_modules(model_folder: str) -> BaseModules:
    """Module shapes of the base model in a folder, read by building it on the meta device:
    no weights are loaded, so this costs no memory whatever the model's size."""
    from transformers import AutoConfig

    from workers.model_loading import read_model_config

    read_model_config(Path(model_folder))  # special files and absurd sizes fail before anything is built
    return config_modules(AutoConfig.from_pretrained(model_folder, local_files_only=True, trust_remote_code=False))


def model_base_modules(model: Model) -> BaseModules:
    """Module shapes of a registered base model: a folder's as `base_modules` reads them; a
    GGUF file's from its config (its header checked as hostile input first), without
    dequantizing anything."""
    if model.source_kind != "gguf":
        return base_modules(model.resolved_path)
    from workers.gguf_models import check_gguf_file, gguf_config

    path = Path(model.resolved_path)
    check_gguf_file(path)
    try:
        config = gguf_config(path)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise JobFailed("model_load_failed", f"could not read the config of the GGUF file {path.name}: {exc}") from exc
    return config_modules(config)


def config_modules(config: Any) -> BaseModules:
    """Module shapes of the model a transformers config describes, built on the meta device."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    linears = {
        name: tuple(module.weight.shape)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)
    }
    embeddings = {
        name: tuple(module.weight.shape)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Embedding)
    }
    input_embedding = next(name for name, module in model.named_modules() if module is model.get_input_embeddings())
    tied = bool(getattr(config.get_text_config(), "tie_word_embeddings", False))
    return BaseModules(linears=linears, embeddings=embeddings, input_embedding=input_embedding, tied_embeddings=tied)  # type: ignore[arg-type]
