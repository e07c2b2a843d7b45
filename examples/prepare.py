"""Prepare what the examples need, offline: a tiny random Llama (standing in for a real base
model), a LoRA checkpoint exported the way Tinker exports one (also packed as the legacy
`.tar` archive), and 120 city statements from the shared data. Everything goes to
`examples/work/`; the manifest there tells the examples where.

    python examples/prepare.py
"""

import json
import sys
import tarfile
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent
ROOT = EXAMPLES.parent
sys.path.insert(0, str(ROOT))

from tests.tiny_models import save_tinker_adapter, save_tiny_llama  # noqa: E402

WORK = EXAMPLES / "work"
CITIES = ROOT.parent / "shared" / "data" / "geometry_of_truth" / "cities.jsonl"


def main() -> None:
    WORK.mkdir(exist_ok=True)
    base = save_tiny_llama(WORK / "tiny-llama", hidden_size=32, layers=4, heads=2, kv_heads=1)
    adapters = {}
    for name, seed in (("sft-v1", 1), ("dpo-v2", 2)):
        export = WORK / "tinker-checkpoints" / name
        save_tinker_adapter(export, base, seed=seed)
        archive = WORK / f"{name}.tar"
        with tarfile.open(archive, "w") as packed:  # what the old SDK's archive URL gave
            for file in sorted(export.iterdir()):
                packed.add(file, f"{name}/{file.name}")
        adapters[name] = {"folder": str(export), "archive": str(archive)}
    statements = WORK / "cities-120.jsonl"
    statements.write_text("\n".join(CITIES.read_text().splitlines()[:120]) + "\n")
    manifest = {"base_model": str(base), "adapters": adapters, "statements": str(statements)}
    (WORK / "manifest.json").write_text(json.dumps(manifest, indent=2))
    print(f"prepared {WORK}")


if __name__ == "__main__":
    main()
