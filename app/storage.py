"""The artifact store: datasets, hidden states, adapters, probes, reports.

Artifacts are named by relative keys (`datasets/<sha>.jsonl`). Writes are atomic — a file
is written under a temporary name in the same folder and renamed into place — so a reader
never sees half an artifact, and a failed write leaves nothing behind.
"""

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import BinaryIO


class ArtifactStore:
    """A folder on a local or shared filesystem."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, key: str) -> Path:
        """The file behind `key`; keys are relative and never leave the store."""
        relative = PurePosixPath(key)
        if relative.is_absolute() or ".." in relative.parts or not relative.parts:
            raise ValueError(f"artifact key {key!r} escapes the store")
        return self.root.joinpath(*relative.parts)

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    @contextmanager
    def writer(self, key: str) -> Iterator[BinaryIO]:
        """Write `key` through a file object; it appears only when the block ends cleanly."""
        target = self.path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        descriptor, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".partial")
        try:
            with os.fdopen(descriptor, "wb") as handle:
                yield handle
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, target)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise

    @contextmanager
    def temporary_path(self, key: str) -> Iterator[Path]:
        """A path for libraries that write files themselves (safetensors); renamed to `key`
        when the block ends cleanly, removed otherwise."""
        target = self.path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        descriptor, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".partial")
        os.close(descriptor)
        try:
            yield Path(temporary)
            os.replace(temporary, target)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise

    def write_bytes(self, key: str, data: bytes) -> None:
        with self.writer(key) as handle:
            handle.write(data)

    def delete(self, key: str) -> None:
        self.path(key).unlink(missing_ok=True)

    def size(self, key: str) -> int:
        return self.path(key).stat().st_size
