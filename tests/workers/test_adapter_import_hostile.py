"""Hostile adapters through the real `adapter_import` job function, on a real registry, Redis
and artifact store: each ends with its own error code (never `internal`), a message that
names the problem and no path of the server, and nothing published or registered."""

import json
import os
import struct
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from app.registry.tables import Adapter
from tests.special_files import call_without_blocking
from tests.workers.adapter_jobs import (  # noqa: F401 (fixtures)
    CONFIG,
    WEIGHTS,
    adapter_folder,
    import_job,
    model_id,
    settings,
    worker,
)
from workers import runtime
from workers.adapters import importer
from workers.errors import JobFailed

# --- hostile inputs ------------------------------------------------------------------


def with_config_text(text: str | bytes) -> Callable[[Path, Path], Path]:
    def make(folder: Path, base: Path) -> Path:
        adapter_folder(folder, base)
        (folder / CONFIG).write_bytes(text if isinstance(text, bytes) else text.encode())
        return folder

    return make


def with_config(**values: Any) -> Callable[[Path, Path], Path]:
    return with_config_text(json.dumps({"r": 4, "lora_alpha": 8} | values))


def header_of(path: Path) -> tuple[dict[str, Any], bytes]:
    content = path.read_bytes()
    (length,) = struct.unpack("<Q", content[:8])
    return json.loads(content[8 : 8 + length]), content[8 + length :]


def with_header(mutate: Callable[[dict[str, Any]], None]) -> Callable[[Path, Path], Path]:
    """The adapter's weights with their header changed by `mutate` (given the header and
    the first tensor's entry), the data as it was."""

    def make(folder: Path, base: Path) -> Path:
        adapter_folder(folder, base)
        header, data = header_of(folder / WEIGHTS)
        mutate(header)
        encoded = json.dumps(header).encode()
        (folder / WEIGHTS).write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)
        return folder

    return make


def first_entry(header: dict[str, Any]) -> dict[str, Any]:
    return min(
        (entry for name, entry in header.items() if name != "__metadata__"), key=lambda entry: entry["data_offsets"][0]
    )


def second_entry(header: dict[str, Any]) -> dict[str, Any]:
    return sorted(
        (entry for name, entry in header.items() if name != "__metadata__"), key=lambda entry: entry["data_offsets"][0]
    )[1]


def set_in(
    entry_of: Callable[[dict[str, Any]], dict[str, Any]], key: str, value: Callable[[Any], Any]
) -> Callable[[dict[str, Any]], None]:
    def mutate(header: dict[str, Any]) -> None:
        entry = entry_of(header)
        entry[key] = value(entry[key])

    return mutate


def with_header_length(length: int) -> Callable[[Path, Path], Path]:
    def make(folder: Path, base: Path) -> Path:
        adapter_folder(folder, base)
        content = (folder / WEIGHTS).read_bytes()
        (folder / WEIGHTS).write_bytes(struct.pack("<Q", length) + content[8:])
        return folder

    return make


def with_fifo(name: str) -> Callable[[Path, Path], Path]:
    def make(folder: Path, base: Path) -> Path:
        adapter_folder(folder, base)
        (folder / name).unlink()
        os.mkfifo(folder / name)
        return folder

    return make


def fifo_archive(folder: Path, base: Path) -> Path:
    archive = folder.with_suffix(".tar.gz")
    os.mkfifo(archive)
    return archive


def zipped(members: list[tuple[str, bytes]]) -> Callable[[Path, Path], Path]:
    def make(folder: Path, base: Path) -> Path:
        archive = folder.with_suffix(".zip")
        with zipfile.ZipFile(archive, "w") as bundle:
            for name, data in members:
                bundle.writestr(name, data)
        return archive

    return make


def zipped_adapter_with_long_name(folder: Path, base: Path) -> Path:
    adapter_folder(folder, base)
    files = [(name, (folder / name).read_bytes()) for name in (CONFIG, WEIGHTS)]
    return zipped([*files, (f"notes/{'n' * 300}.txt", b"x")])(folder.parent / "long", base)


HOSTILE: dict[str, tuple[Callable[[Path, Path], Path], str]] = {
    "target_modules is a number": (with_config(target_modules=5), "unsupported_adapter"),
    "r is a string": (with_config(r="x"), "unsupported_adapter"),
    "r is true": (with_config(r=True), "unsupported_adapter"),
    "r is zero": (with_config(r=0), "unsupported_adapter"),
    "r is past the bound": (with_config(r=1 << 20), "unsupported_adapter"),
    "lora_alpha is a string": (with_config(lora_alpha="8"), "unsupported_adapter"),
    "use_rslora is a string": (with_config(use_rslora="yes"), "unsupported_adapter"),
    "the config is nested too deep": (with_config_text("[" * 100_000 + "]" * 100_000), "unsupported_adapter"),
    "the config is a list": (with_config_text("[4, 8]"), "unsupported_adapter"),
    "the config is not UTF-8": (with_config_text(b'{"r": 4, "lora_alpha": 8, "x": "\xff"}'), "unsupported_adapter"),
    "lora_alpha is NaN": (with_config_text('{"r": 4, "lora_alpha": NaN}'), "unsupported_adapter"),
    "lora_alpha is Infinity": (with_config_text('{"r": 4, "lora_alpha": Infinity}'), "unsupported_adapter"),
    "lora_alpha overflows to infinity": (with_config_text('{"r": 4, "lora_alpha": 1e999}'), "unsupported_adapter"),
    "lora_alpha is -1e308": (with_config(lora_alpha=-1e308), "unsupported_adapter"),
    "lora_alpha is zero": (with_config(lora_alpha=0), "unsupported_adapter"),
    "lora_dropout is 1.5": (with_config(lora_dropout=1.5), "unsupported_adapter"),
    "use_dora is on": (with_config(use_dora=True), "unsupported_adapter"),
    "modules_to_save is set": (with_config(modules_to_save=["lm_head"]), "unsupported_adapter"),
    "alpha_pattern is set": (with_config(alpha_pattern={"q_proj": 64}), "unsupported_adapter"),
    "the config is over a MiB": (with_config(notes="x" * (1 << 20)), "too_large"),
    "offsets are strings": (
        with_header(set_in(first_entry, "data_offsets", lambda o: [str(o[0]), str(o[1])])),
        "invalid_weights",
    ),
    "offsets are floats": (
        with_header(set_in(first_entry, "data_offsets", lambda o: [float(o[0]), float(o[1])])),
        "invalid_weights",
    ),
    "offsets overlap": (
        with_header(set_in(second_entry, "data_offsets", lambda o: [o[0] - 4, o[1] - 4])),
        "invalid_weights",
    ),
    "offsets run past the file": (
        with_header(set_in(first_entry, "data_offsets", lambda o: [o[0], o[1] + (1 << 40)])),
        "invalid_weights",
    ),
    "a dimension is negative": (with_header(set_in(first_entry, "shape", lambda s: [-s[0], -s[1]])), "invalid_weights"),
    "dimensions are huge": (with_header(set_in(first_entry, "shape", lambda s: [1 << 62, 1 << 62])), "invalid_weights"),
    "a dimension is a float": (
        with_header(set_in(first_entry, "shape", lambda s: [float(s[0]), s[1]])),
        "invalid_weights",
    ),
    "the dtype is unknown": (with_header(set_in(first_entry, "dtype", lambda d: "F128")), "invalid_weights"),
    "metadata values are not strings": (
        with_header(lambda h: h.update({"__metadata__": {"format": 5}})),
        "invalid_weights",
    ),
    "an entry is a list": (
        with_header(lambda h: h.update({"base_model.model.x.lora_A.weight": [1, 2]})),
        "invalid_weights",
    ),
    "the header length is past the file": (with_header_length(1 << 40), "invalid_weights"),
    "the weights are a FIFO": (with_fifo(WEIGHTS), "invalid_weights"),
    "the config is a FIFO": (with_fifo(CONFIG), "unsupported_adapter"),
    "the archive is a FIFO": (fifo_archive, "special_file"),
    "a zip member's name is too long": (zipped_adapter_with_long_name, "name_too_long"),
    "a zip lists too many entries": (zipped([(f"f{index}.json", b"{}") for index in range(100)]), "too_many_files"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_a_hostile_adapter_fails_with_its_own_code_naming_no_server_path(
    worker: runtime.WorkerRuntime, model_id: str, tiny_llama: Path, tmp_path: Path, case: str
) -> None:
    make, code = HOSTILE[case]
    source = make(tmp_path / "adapter", tiny_llama)
    context = import_job(worker, model_id, "local_folder" if source.is_dir() else "local_archive", source)
    fifos = [path for path in tmp_path.rglob("*") if path.is_fifo()]
    with pytest.raises(JobFailed) as failure:
        call_without_blocking(lambda: importer.run(context), fifos)
    assert (failure.value.code, case) == (code, case), failure.value.message
    for server_path in (str(tmp_path), os.getcwd(), str(worker.settings.var_dir)):
        assert server_path not in failure.value.message
    assert not (worker.artifacts.scratch_root.parent / "adapters").exists() or not any(
        (worker.artifacts.scratch_root.parent / "adapters").iterdir()
    )
    with worker.sessions() as session:
        assert session.query(Adapter).count() == 0


def test_a_full_disk_is_store_full_with_no_path_in_the_message() -> None:
    with pytest.raises(OSError) as raised, open("/dev/full", "wb", buffering=0) as device:
        device.write(b"x")
    failure = importer.os_failure(raised.value)
    assert failure is not None and failure.code == "store_full"
    assert "/dev" not in failure.message and failure.details["errno"] == "ENOSPC"
