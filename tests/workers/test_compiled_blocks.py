"""Compiled blocks (the `extraction_compile` setting; `compiled_blocks` in
workers/hidden_states.py): blocks run through `torch.compile` give each text the vectors of a
direct Hugging Face forward pass on it alone, the model is left as it was, a worker
without a C++ compiler for TorchInductor runs its blocks eagerly, and so does one whose
compiler fails."""

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import make_settings, require
from tests.workers.test_shared_prefix import ALWAYS, TEXTS, direct, tiny, token_ids  # noqa: F401 (fixture)
from workers import hidden_states, runtime
from workers.hidden_states import find_blocks, inductor_compiler, read_texts

pytestmark = pytest.mark.slow  # each block class compiles once a process: seconds


@pytest.fixture(autouse=True)
def compiler() -> None:
    require(inductor_compiler() is not None, "TorchInductor needs a C++ compiler ($CXX, else g++)")


def assert_equals_direct(model: Any, ids: list[list[int]], got: torch.Tensor, layers: list[int], position: str) -> None:
    for row, text_ids in enumerate(ids):
        expected = direct(model, text_ids, layers, position)
        scale = float(expected.abs().max())
        torch.testing.assert_close(got[row], expected, atol=1e-4 * scale, rtol=1e-4, msg=f"text {row}")


@pytest.fixture
def forwards_seen(tiny: tuple[Any, Any]) -> Any:
    """Which `forward` each block of the tiny model ran with: its instance's own (the
    compiled one, a partial) or None (its class's)."""
    model, _ = tiny
    seen: list[Any] = []
    handles = [
        block.register_forward_pre_hook(lambda module, args: seen.append(vars(module).get("forward")))
        for block in find_blocks(model)
    ]
    yield seen
    for handle in handles:
        handle.remove()


@pytest.mark.parametrize("token_position", ["last", "mean"])
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_compiled_blocks_give_each_text_the_vectors_of_a_direct_forward_pass(
    tiny: tuple[Any, Any], forwards_seen: list[Any], padding_side: str, token_position: str
) -> None:
    model, tokenizer = tiny
    layers = [0, 1, 3]
    ids = token_ids(tokenizer, "raw", TEXTS)
    got = read_texts(
        model, ids, layers, token_position, pad_id=0, device="cpu", padding_side=padding_side, compiled=True
    )
    assert_equals_direct(model, ids, got, layers, token_position)
    # the blocks before the deepest ran compiled (the deepest too, unless it ran trimmed)
    assert forwards_seen[0] is not None and forwards_seen[1] is not None
    assert all("forward" not in vars(block) for block in find_blocks(model)), "a block kept its compiled forward"


@pytest.mark.parametrize("prompt_format", ["chat", "raw"])
def test_batches_with_a_shared_prefix_run_eagerly_and_equal_a_direct_forward_pass(
    tiny: tuple[Any, Any], forwards_seen: list[Any], prompt_format: str
) -> None:
    model, tokenizer = tiny
    ids = token_ids(tokenizer, prompt_format, TEXTS[:3])
    got = read_texts(model, ids, [1, 2], "last", pad_id=0, device="cpu", shortcuts=ALWAYS, compiled=True)
    assert_equals_direct(model, ids, got, [1, 2], "last")
    assert set(forwards_seen) == {None}, "a block with the prefix's cache ran compiled"


@pytest.mark.parametrize("token_position", ["last", "mean"])
def test_smollm2_compiled_vectors_equal_a_direct_forward_pass(
    smollm2_gguf_model: Any, smollm2_gguf: Path, token_position: str
) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    layers = [0, 8, 16]
    ids = token_ids(tokenizer, "raw", TEXTS)
    got = read_texts(smollm2_gguf_model, ids, layers, token_position, pad_id=0, device="cpu", compiled=True)
    assert_equals_direct(smollm2_gguf_model, ids, got, layers, token_position)


def test_a_worker_without_a_cpp_compiler_runs_its_blocks_eagerly(
    database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    assert inductor_compiler() is None
    settings = make_settings(database_url, "redis://127.0.0.1:1/0", tmp_path / "var", extraction_compile=True)
    assert runtime.build_runtime(settings).settings.extraction_compile is False
    monkeypatch.delenv("CXX")
    assert runtime.build_runtime(settings).settings.extraction_compile is True
    assert hidden_states.inductor_compiler() is not None


# A C++ compiler that answers for its version but fails every build (as one reading a damaged
# precompiled header did), counting the builds it was asked for.
BROKEN_COMPILER = """#!/bin/sh
case "$*" in *--version*|*-dumpversion*|*-v) exec g++ "$@";; esac
echo "$@" >> "$(dirname "$0")/builds"
echo "g++: internal compiler error" >&2
exit 1
"""

# Three texts read eagerly, then compiled (the compiler fails), then compiled again: the
# vectors' differences from the eager ones and the builds attempted after each compiled read.
BROKEN_COMPILE = """
import json, sys, tempfile
from pathlib import Path
from transformers import AutoModelForCausalLM
from tests import tiny_models
from workers import hidden_states

folder = tiny_models.save_tiny_llama(Path(tempfile.mkdtemp()), layers=3)
model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()
builds = Path(sys.argv[1])
ids = [[5, 6, 7, 8, 9], [10, 11, 12], [13, 14, 15, 16]]
def read(compiled):
    return hidden_states.read_texts(model, ids, [1, 3], "last", pad_id=0, device="cpu", compiled=compiled)
eager = read(False)
first = read(True)
after_first = len(builds.read_text().splitlines()) if builds.exists() else 0
again = read(True)
print(json.dumps({
    "first": float((first - eager).abs().max()),
    "again": float((again - eager).abs().max()),
    "builds_after_first": after_first,
    "builds_after_again": len(builds.read_text().splitlines()) if builds.exists() else 0,
    "failure": hidden_states.compile_failure(),
}))
"""


def test_a_compiler_that_fails_leaves_the_blocks_eager_with_the_same_vectors(tmp_path: Path) -> None:
    compiler = tmp_path / "g++"
    compiler.write_text(BROKEN_COMPILER)
    compiler.chmod(0o755)
    environment = {**os.environ, "CXX": str(compiler), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    done = subprocess.run(
        [sys.executable, "-c", BROKEN_COMPILE, str(tmp_path / "builds")],
        capture_output=True,
        text=True,
        env=environment,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.splitlines()[-1])
    # the failing batch itself was read eagerly, and so was the next, without a new attempt
    assert result["first"] == 0.0 and result["again"] == 0.0
    assert result["builds_after_first"] >= 1
    assert result["builds_after_again"] == result["builds_after_first"]
    assert "C++ compile error" in result["failure"]
    assert "compiling blocks failed" in done.stderr
