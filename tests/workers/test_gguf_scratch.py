"""Scratch folders of the GGUF cache: one a worker killed mid-write left behind is removed once
nothing has been written into it for STALE_SCRATCH_AGE_S; one a build may still be writing
into stays. Ages are set with `os.utime`; no model is loaded."""

import os
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from app.inputs.model_sources import fingerprint, resolve_source, source_shape
from app.registry.models import new_model
from tests.test_gguf import LLAMA_PAIRS, gguf_file
from workers import gguf_models
from workers.gguf_models import STALE_SCRATCH_AGE_S, cache_entry, dequantized_folder, remove_stale_scratch

SHA = "ab" * 32


def scratch_folder(cache_dir: Path, age_s: float, name: str = f"{SHA}-float32") -> Path:
    """A scratch folder holding a half-written weights file, last written `age_s` ago."""
    scratch = cache_dir / f".{name}.{os.urandom(8).hex()}.partial"
    scratch.mkdir(parents=True)
    set_age(scratch / "model.safetensors", age_s, b"half")
    set_age(scratch, age_s)
    return scratch


def set_age(path: Path, age_s: float, content: bytes | None = None) -> None:
    if content is not None:
        path.write_bytes(content)
    then = time.time() - age_s
    os.utime(path, (then, then), follow_symlinks=False)


def test_a_scratch_folder_left_for_over_the_safe_age_is_removed_and_a_fresh_one_is_kept(tmp_path: Path) -> None:
    old = scratch_folder(tmp_path, STALE_SCRATCH_AGE_S + 60)
    fresh = scratch_folder(tmp_path, 60)
    assert remove_stale_scratch(tmp_path) == [old]
    assert not old.exists() and (fresh / "model.safetensors").read_bytes() == b"half"


def test_an_old_scratch_folder_with_a_file_still_being_written_is_kept(tmp_path: Path) -> None:
    writing = scratch_folder(tmp_path, STALE_SCRATCH_AGE_S + 60)
    # its weights file written a second ago, the folder itself unchanged for over the safe age
    set_age(writing / "model.safetensors", 1, b"half and growing")
    set_age(writing, STALE_SCRATCH_AGE_S + 60)
    assert remove_stale_scratch(tmp_path) == []
    assert writing.exists()


def test_old_cache_entries_other_files_and_links_named_as_scratch_are_left_alone(tmp_path: Path) -> None:
    entry = tmp_path / f"{SHA}-float32"
    entry.mkdir()
    set_age(entry / "model.safetensors", 10 * STALE_SCRATCH_AGE_S, b"whole")
    set_age(entry, 10 * STALE_SCRATCH_AGE_S)
    elsewhere = scratch_folder(tmp_path / "elsewhere", 10 * STALE_SCRATCH_AGE_S)
    link = tmp_path / f".{SHA}-float32.0123456789abcdef.partial"
    link.symlink_to(elsewhere, target_is_directory=True)
    set_age(link, 10 * STALE_SCRATCH_AGE_S)
    not_a_folder = tmp_path / f".{SHA}-float16.0123456789abcdef.partial"
    set_age(not_a_folder, 10 * STALE_SCRATCH_AGE_S, b"a file")
    assert remove_stale_scratch(tmp_path) == []
    assert entry.exists() and link.is_symlink() and elsewhere.exists() and not_a_folder.exists()


def test_a_cache_folder_that_does_not_exist_has_nothing_to_remove(tmp_path: Path) -> None:
    assert remove_stale_scratch(tmp_path / "missing") == []


def test_building_a_cache_entry_removes_the_stale_scratch_folders_beside_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "tiny.gguf"
    path.write_bytes(gguf_file(LLAMA_PAIRS))
    source = resolve_source(str(path), None)
    row = new_model(path.name, source, None, "float32", None, source_shape(source), fingerprint(source))
    cache_dir = tmp_path / "cache"
    old = scratch_folder(cache_dir, STALE_SCRATCH_AGE_S + 60, name=f"{row.fingerprint}-float32")
    fresh = scratch_folder(cache_dir, 60, name="another-file-float32")

    def write_weights(_path: Path, _dtype: Any, folder: Path) -> None:
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"weights")

    monkeypatch.setattr(gguf_models, "_write_dequantized", write_weights)
    entry = dequantized_folder(row, torch.float32, cache_dir)
    assert entry == cache_entry(cache_dir, row)
    assert sorted(path.name for path in cache_dir.iterdir()) == sorted([fresh.name, entry.name])
    assert not old.exists()
