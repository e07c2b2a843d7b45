"""Untrusted adapter archives: every kind of hostile archive is refused with its own code and
leaves nothing behind; good archives come out byte for byte. The hostile corpus is built here."""

import gzip
import io
import os
import pickle
import stat
import struct
import subprocess
import sys
import tarfile
import tracemalloc
import warnings
import zipfile
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from app.inputs.archives import ArchiveLimits, ArchiveRejected, archive_format, extract_archive
from tests.conftest import ROOT
from tests.special_files import call_without_blocking

LIMITS = ArchiveLimits(max_files=8, max_total_bytes=4 * 2**20)
FORMATS = ["tar", "tar.gz", "zip"]
GOOD_FILE = ("adapter_config.json", b'{"r": 4, "lora_alpha": 8}')

TarMember = tuple[tarfile.TarInfo, bytes]
ZipMember = tuple[zipfile.ZipInfo, bytes]


def tar_member(name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, linkname: str = "") -> TarMember:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    return info, data


def zip_member(name: str, data: bytes = b"", mode: int = stat.S_IFREG | 0o644) -> ZipMember:
    info = zipfile.ZipInfo(name)
    info.external_attr, info.compress_type = mode << 16, zipfile.ZIP_DEFLATED
    return info, data


def write_tar(path: Path, members: list[TarMember], compressed: bool = False) -> Path:
    with tarfile.open(path, "w:gz" if compressed else "w", format=tarfile.GNU_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return path


def write_zip(path: Path, members: list[ZipMember]) -> Path:
    with warnings.catch_warnings(), zipfile.ZipFile(path, "w") as bundle:
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate names some tests want
        for info, data in members:
            bundle.writestr(info, data)
    return path


def packed(directory: Path, archive_type: str, files: list[tuple[str, bytes]]) -> Path:
    """`files` (name, content), in order, as an archive of `archive_type`."""
    path = directory / f"upload.{archive_type}"
    if archive_type == "zip":
        return write_zip(path, [zip_member(name, data) for name, data in files])
    return write_tar(path, [tar_member(name, data) for name, data in files], compressed=archive_type == "tar.gz")


def rejection(archive: Path, destination: Path, limits: ArchiveLimits = LIMITS) -> ArchiveRejected:
    """The error extracting `archive` raises, once it is checked that nothing was left behind."""
    with pytest.raises(ArchiveRejected) as raised:
        extract_archive(archive, destination, limits)
    assert not destination.exists()
    return raised.value


def assert_rejected(
    archive: Path, destination: Path, code: str, member: str, limits: ArchiveLimits = LIMITS
) -> ArchiveRejected:
    error = rejection(archive, destination, limits)
    assert (error.code, error.member) == (code, member)
    assert repr(member) in error.message
    return error


@pytest.mark.parametrize("archive_type", FORMATS)
@pytest.mark.parametrize(
    "name",
    ["../evil.json", "adapter/../../evil.json", "/etc/evil.json", "C:\\evil.json", "\\evil.json", "..\\evil.json"],
)
def test_names_that_escape_the_destination_are_path_traversal(tmp_path: Path, archive_type: str, name: str) -> None:
    archive = packed(tmp_path, archive_type, [GOOD_FILE, (name, b"{}")])
    error = assert_rejected(archive, tmp_path / "out", "path_traversal", name)
    assert error.status == 422
    assert not (tmp_path / "evil.json").exists()


@pytest.mark.parametrize("kind", [tarfile.SYMTYPE, tarfile.LNKTYPE], ids=["symlink", "hardlink"])
def test_tar_links_are_refused(tmp_path: Path, kind: bytes) -> None:
    archive = write_tar(
        tmp_path / "a.tar",
        [tar_member(*GOOD_FILE), tar_member("adapter_model.safetensors", kind=kind, linkname="/etc/passwd")],
    )
    assert_rejected(archive, tmp_path / "out", "link", "adapter_model.safetensors")


def test_zip_symlinks_are_refused(tmp_path: Path) -> None:
    link = zip_member("adapter_model.safetensors", b"/etc/passwd", mode=stat.S_IFLNK | 0o777)
    archive = write_zip(tmp_path / "a.zip", [zip_member(*GOOD_FILE), link])
    assert_rejected(archive, tmp_path / "out", "link", "adapter_model.safetensors")


@pytest.mark.parametrize("kind", [tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.FIFOTYPE], ids=["char", "block", "fifo"])
def test_tar_devices_and_fifos_are_special_files(tmp_path: Path, kind: bytes) -> None:
    archive = write_tar(tmp_path / "a.tar", [tar_member(*GOOD_FILE), tar_member("device", kind=kind)])
    assert_rejected(archive, tmp_path / "out", "special_file", "device")


def test_zip_fifos_are_special_files(tmp_path: Path) -> None:
    archive = write_zip(tmp_path / "a.zip", [zip_member(*GOOD_FILE), zip_member("pipe", mode=stat.S_IFIFO | 0o644)])
    assert_rejected(archive, tmp_path / "out", "special_file", "pipe")


@pytest.mark.parametrize("archive_type", ["tar", "tar.gz"])
def test_one_file_more_than_the_limit_is_too_many_files(tmp_path: Path, archive_type: str) -> None:
    files = [(f"shard-{index}.json", b"{}") for index in range(LIMITS.max_files + 1)]
    error = assert_rejected(packed(tmp_path, archive_type, files), tmp_path / "out", "too_many_files", files[-1][0])
    assert error.status == 413


def test_a_zip_listing_more_entries_than_the_limit_is_refused_before_any_member_is_read(tmp_path: Path) -> None:
    files = [(f"shard-{index}.json", b"{}") for index in range(LIMITS.max_files * 4)]
    archive = with_damaged_local_header(packed(tmp_path, "zip", files), member=1)  # reading members would fail there
    error = rejection(archive, tmp_path / "out")
    assert (error.code, error.status, error.member) == ("too_many_files", 413, None)
    assert str(LIMITS.max_files * 4) in error.message


def test_a_zip64_end_record_listing_too_many_entries_is_refused(tmp_path: Path) -> None:
    files = [(f"shard-{index}.json", b"{}") for index in range(LIMITS.max_files + 1)]
    archive = with_zip64_end_record(with_damaged_local_header(packed(tmp_path, "zip", files), member=1))
    error = rejection(archive, tmp_path / "out")
    assert (error.code, error.status) == ("too_many_files", 413)


def test_a_zip64_end_record_within_the_limit_still_extracts(tmp_path: Path) -> None:
    archive = with_zip64_end_record(packed(tmp_path, "zip", [GOOD_FILE]))
    assert [path.read_bytes() for path in extract_archive(archive, tmp_path / "out", LIMITS)] == [GOOD_FILE[1]]


def test_a_zip_central_directory_larger_than_its_entries_need_is_too_large(tmp_path: Path) -> None:
    members = []
    for index in range(3):
        info, data = zip_member(f"file-{index}.json", b"{}")
        info.comment = b"c" * 60_000
        members.append((info, data))
    error = rejection(write_zip(tmp_path / "a.zip", members), tmp_path / "out")
    assert (error.code, error.status) == ("too_large", 413)
    assert "central directory" in error.message


def with_damaged_local_header(path: Path, member: int) -> Path:
    """The zip with the local header signature of its `member`-th member overwritten."""
    with zipfile.ZipFile(path) as bundle:
        offset = bundle.infolist()[member].header_offset
    content = bytearray(path.read_bytes())
    content[offset : offset + 4] = b"XXXX"
    path.write_bytes(bytes(content))
    return path


def with_zip64_end_record(path: Path) -> Path:
    """The zip rewritten to announce its entries through a zip64 end record and locator, the
    classic record saying only 'see zip64' (0xFFFF, 0xFFFFFFFF)."""
    content = path.read_bytes()
    classic = content[-22:]
    assert classic[:4] == b"PK\x05\x06"
    _, _, _, _, entries, directory_bytes, directory_offset, _ = struct.unpack("<4s4H2LH", classic)
    zip64_at = len(content) - 22
    zip64 = struct.pack(
        "<4sQ2H2L4Q", b"PK\x06\x06", 44, 45, 45, 0, 0, entries, entries, directory_bytes, directory_offset
    )
    locator = struct.pack("<4sLQL", b"PK\x06\x07", 0, zip64_at, 1)
    end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0)
    path.write_bytes(content[:zip64_at] + zip64 + locator + end)
    return path


@pytest.mark.parametrize("archive_type", FORMATS)
def test_a_name_part_longer_than_filesystems_allow_is_name_too_long(tmp_path: Path, archive_type: str) -> None:
    name = f"folder/{'a' * 300}.safetensors"
    error = rejection(packed(tmp_path, archive_type, [GOOD_FILE, (name, b"{}")]), tmp_path / "out")
    assert (error.code, error.status) == ("name_too_long", 422)
    assert str(tmp_path) not in error.message


def test_an_archive_that_is_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "adapter.zip"
    os.mkfifo(fifo)
    with pytest.raises(ArchiveRejected) as raised:
        call_without_blocking(lambda: extract_archive(fifo, tmp_path / "out", LIMITS), [fifo])
    assert (raised.value.code, raised.value.status) == ("special_file", 422)
    assert "FIFO" in raised.value.message and str(tmp_path) not in raised.value.message
    assert not (tmp_path / "out").exists()


def test_the_format_of_a_fifo_or_a_device_behind_a_link_is_not_read(tmp_path: Path) -> None:
    fifo, device = tmp_path / "adapter.tar", tmp_path / "zeros.tar"
    os.mkfifo(fifo)
    device.symlink_to("/dev/zero")
    for path in (fifo, device):
        with pytest.raises(ArchiveRejected) as raised:
            call_without_blocking(partial(archive_format, path), [fifo])
        assert raised.value.code == "special_file"


def test_a_flood_of_directory_entries_is_too_many_files(tmp_path: Path) -> None:
    directories = [tar_member(f"folder-{index}", kind=tarfile.DIRTYPE) for index in range(LIMITS.max_files + 1)]
    archive = write_tar(tmp_path / "a.tar", [tar_member(*GOOD_FILE), *directories])
    assert_rejected(archive, tmp_path / "out", "too_many_files", directories[-1][0].name)


@pytest.mark.parametrize("archive_type", FORMATS)
def test_files_over_the_byte_limit_together_are_too_large(tmp_path: Path, archive_type: str) -> None:
    half_and_more = bytes(LIMITS.max_total_bytes // 2 + 1)
    files = [GOOD_FILE, ("first.safetensors", half_and_more), ("second.safetensors", half_and_more)]
    error = assert_rejected(packed(tmp_path, archive_type, files), tmp_path / "out", "too_large", "second.safetensors")
    assert error.status == 413


@pytest.mark.parametrize("archive_type", FORMATS)
@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("adapter/config.json", "adapter/config.json"),
        ("adapter/config.json", "./adapter//config.json"),
        ("adapter/README.md", "adapter/readme.MD"),
        ("adapter/weights", "adapter/weights/shard.safetensors"),
        ("adapter/weights/shard.safetensors", "adapter/weights"),
        ("adapter/caf\u00e9.json", "adapter/cafe\u0301.json"),
    ],
    ids=["same", "dot-and-double-slash", "letter-case", "file-then-folder", "folder-then-file", "unicode-composition"],
)
def test_members_that_land_on_one_path_are_duplicate_names(
    tmp_path: Path, archive_type: str, first: str, second: str
) -> None:
    archive = packed(tmp_path, archive_type, [(first, b"{}"), (second, b"{}")])
    assert_rejected(archive, tmp_path / "out", "duplicate_name", second)


@pytest.mark.parametrize("suffix", [".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".BIN"])
def test_weights_named_as_pickles_are_refused(tmp_path: Path, suffix: str) -> None:
    name = f"adapter/adapter_model{suffix}"
    archive = packed(tmp_path, "tar.gz", [GOOD_FILE, (name, b"not even a pickle")])
    error = assert_rejected(archive, tmp_path / "out", "pickle_weights", name)
    assert "safetensors" in error.message


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_a_pickle_under_any_name_is_refused(tmp_path: Path, protocol: int) -> None:
    disguised = pickle.dumps({"lora_A": [0.0] * 8}, protocol=protocol)
    archive = packed(tmp_path, "zip", [GOOD_FILE, ("adapter_model.safetensors", disguised)])
    error = assert_rejected(archive, tmp_path / "out", "pickle_weights", "adapter_model.safetensors")
    assert "safetensors" in error.message


def zip_of_many_entries(entries: int, last: str) -> bytes:
    """A zip of `entries` empty members, the last named `last`."""
    content = io.BytesIO()
    with zipfile.ZipFile(content, "w") as bundle:
        for index in range(entries - 1):
            bundle.writestr(f"e/{index:08d}", b"")
        bundle.writestr(last, b"")
    return content.getvalue()


def test_a_member_that_is_a_zip_of_many_entries_is_inspected_without_holding_its_directory(tmp_path: Path) -> None:
    nested = zip_of_many_entries(40_000, "e/last.txt")
    archive = packed(tmp_path, "tar", [GOOD_FILE, ("notes.zip", nested)])
    tracemalloc.start()
    try:
        extract_archive(archive, tmp_path / "out", LIMITS)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2 * len(nested), (
        f"{peak} bytes traced to inspect a {len(nested)}-byte nested zip"
    )  # zipfile would hold ~6x


def test_a_torch_checkpoint_whose_data_pkl_is_listed_last_is_still_found(tmp_path: Path) -> None:
    archive = packed(
        tmp_path, "zip", [GOOD_FILE, ("weights.safetensors", zip_of_many_entries(500, "archive/data.pkl"))]
    )
    assert_rejected(archive, tmp_path / "out", "pickle_weights", "weights.safetensors")


def test_a_torch_zip_checkpoint_under_any_name_is_refused(tmp_path: Path) -> None:
    checkpoint = io.BytesIO()
    with zipfile.ZipFile(checkpoint, "w") as nested:
        nested.writestr("archive/data.pkl", pickle.dumps({"weight": 0}, protocol=2))
        nested.writestr("archive/data/0", bytes(64))
    archive = packed(tmp_path, "tar", [GOOD_FILE, ("adapter_model.safetensors", checkpoint.getvalue())])
    assert_rejected(archive, tmp_path / "out", "pickle_weights", "adapter_model.safetensors")


def truncated(path: Path, fraction: float) -> Path:
    content = path.read_bytes()
    path.write_bytes(content[: int(len(content) * fraction)])
    return path


def with_flipped_bytes(path: Path, start: int, count: int) -> Path:
    content = bytearray(path.read_bytes())
    content[start : start + count] = bytes(byte ^ 0xFF for byte in content[start : start + count])
    path.write_bytes(bytes(content))
    return path


def corrupt_archives(directory: Path) -> Iterator[tuple[str, Path]]:
    noise = np.random.default_rng(0).bytes(200_000)  # incompressible, so damage lands in the data
    yield "truncated tar", truncated(packed(directory, "tar", [GOOD_FILE, ("weights.safetensors", noise)]), 0.6)
    yield "truncated tar.gz", truncated(packed(directory, "tar.gz", [GOOD_FILE, ("weights.safetensors", noise)]), 0.6)
    yield "truncated zip", truncated(packed(directory, "zip", [GOOD_FILE, ("weights.safetensors", noise)]), 0.6)
    yield (
        "zip with damaged data",
        with_flipped_bytes(packed(directory, "zip", [("weights.safetensors", noise)]), 100_000, 16),
    )
    not_a_tar = directory / "not-a-tar.tar.gz"
    not_a_tar.write_bytes(gzip.compress(b"adapter_config.json\n" * 100))
    yield "gzip of no tar", not_a_tar


@pytest.mark.parametrize(
    "case",
    range(5),
    ids=["truncated tar", "truncated tar.gz", "truncated zip", "zip with damaged data", "gzip of no tar"],
)
def test_corrupt_or_truncated_archives_are_corrupt_archive(tmp_path: Path, case: int) -> None:
    _, archive = list(corrupt_archives(tmp_path))[case]
    error = rejection(archive, tmp_path / "out")
    assert (error.code, error.status) == ("corrupt_archive", 422)


def test_an_oversized_tar_header_is_refused_before_it_is_read_into_memory(tmp_path: Path) -> None:
    # a GNU long name is read whole by tarfile; one bigger than any real path must not be
    archive = write_tar(
        tmp_path / "a.tar.gz", [tar_member(*GOOD_FILE), tar_member("a" * (2 * 2**20), b"{}")], compressed=True
    )
    error = rejection(archive, tmp_path / "out")
    assert (error.code, error.status, error.member) == ("too_large", 413, None)


@pytest.mark.parametrize(
    "content", [b"BZh91AY&SY" + bytes(600), b"adapter_config.json\n" * 40, b""], ids=["bzip2", "text", "empty"]
)
def test_anything_but_tar_gzip_or_zip_is_an_unsupported_format(tmp_path: Path, content: bytes) -> None:
    upload = tmp_path / "adapter.tar.gz"
    upload.write_bytes(content)
    with pytest.raises(ArchiveRejected) as raised:
        archive_format(upload)
    assert raised.value.code == "unsupported_format"
    assert rejection(upload, tmp_path / "out").code == "unsupported_format"


def test_an_existing_destination_is_refused_and_left_alone(tmp_path: Path) -> None:
    destination = tmp_path / "out"
    destination.mkdir()
    (destination / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        extract_archive(packed(tmp_path, "zip", [GOOD_FILE]), destination, LIMITS)
    assert (destination / "keep.txt").read_text() == "mine"


def adapter_files(directory: Path) -> dict[str, bytes]:
    weights = directory / "weights.safetensors"
    save_file(
        {"base_model.model.layers.0.self_attn.q_proj.lora_A.weight": np.arange(64, dtype=np.float32).reshape(4, 16)},
        weights,
    )
    return {GOOD_FILE[0]: GOOD_FILE[1], "adapter_model.safetensors": weights.read_bytes()}


@pytest.mark.parametrize("archive_type", FORMATS)
@pytest.mark.parametrize(
    "folder", ["", "./", "my-adapter/", "./my-adapter/"], ids=["top-level", "dot", "one-folder", "dot-folder"]
)
def test_a_good_adapter_extracts_byte_for_byte(tmp_path: Path, archive_type: str, folder: str) -> None:
    files = adapter_files(tmp_path)
    members = [(f"{folder}{name}", content) for name, content in files.items()]
    if archive_type == "zip":
        archive = write_zip(
            tmp_path / "a.zip",
            ([zip_member(folder, mode=stat.S_IFDIR | 0o755)] if folder else []) + [zip_member(*m) for m in members],
        )
    else:
        directory = [tar_member(folder, kind=tarfile.DIRTYPE)] if folder else []
        archive = write_tar(
            tmp_path / "a.tar", directory + [tar_member(*m) for m in members], compressed=archive_type == "tar.gz"
        )
    destination = tmp_path / "out"
    extracted = extract_archive(archive, destination, LIMITS)
    expected = [destination / folder / name for name in files]
    assert [path.resolve() for path in extracted] == [path.resolve() for path in expected]
    assert {path.name: path.read_bytes() for path in extracted} == files
    assert sorted(path for path in destination.rglob("*") if path.is_file()) == sorted(extracted)


@pytest.mark.parametrize(
    ("archive_type", "lying_name"), [("zip", "adapter.tar.gz"), ("tar.gz", "adapter.zip"), ("tar", "adapter.tgz")]
)
def test_the_format_is_read_from_the_content_not_the_name(tmp_path: Path, archive_type: str, lying_name: str) -> None:
    files = adapter_files(tmp_path)
    archive = packed(tmp_path, archive_type, list(files.items())).rename(tmp_path / lying_name)
    assert archive_format(archive) == archive_type
    extracted = extract_archive(archive, tmp_path / "out", LIMITS)
    assert {path.name: path.read_bytes() for path in extracted} == files


GIB = 2**30


@pytest.fixture
def decompressed_bytes(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Bytes handed out by the gzip and zip-member readers while a test runs."""
    counts = {"gzip": 0, "zip": 0}

    def counting(reader: type[io.BufferedIOBase], key: str) -> None:
        real_read = reader.read

        def read(self: io.BufferedIOBase, size: int = -1) -> bytes:
            data = real_read(self, size)
            counts[key] += len(data)
            return data

        monkeypatch.setattr(reader, "read", read)

    counting(gzip.GzipFile, "gzip")
    counting(zipfile.ZipExtFile, "zip")
    return counts


def test_a_gzip_bomb_is_stopped_just_past_the_limit(tmp_path: Path, decompressed_bytes: dict[str, int]) -> None:
    bomb = tmp_path / "bomb.tar.gz"
    header = tarfile.TarInfo("adapter_model.safetensors")
    header.size = GIB
    zeros = bytes(2**20)
    with gzip.open(bomb, "wb", compresslevel=1) as stream:  # level 1: the fastest to write
        stream.write(header.tobuf(format=tarfile.GNU_FORMAT))
        for _ in range(GIB // len(zeros)):
            stream.write(zeros)
        stream.write(bytes(2 * tarfile.BLOCKSIZE))  # end of archive
    assert bomb.stat().st_size < 8 * 2**20

    assert_rejected(bomb, tmp_path / "out", "too_large", "adapter_model.safetensors")
    assert LIMITS.max_total_bytes < decompressed_bytes["gzip"] < LIMITS.max_total_bytes + 2**20


def test_a_zip_bomb_is_stopped_just_past_the_limit(tmp_path: Path, decompressed_bytes: dict[str, int]) -> None:
    bomb = tmp_path / "bomb.zip"
    zeros = bytes(2**20)
    with (
        zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as bundle,
        bundle.open("adapter_model.safetensors", "w", force_zip64=True) as member,
    ):
        for _ in range(GIB // len(zeros)):
            member.write(zeros)
    assert bomb.stat().st_size < 8 * 2**20

    assert_rejected(bomb, tmp_path / "out", "too_large", "adapter_model.safetensors")
    assert LIMITS.max_total_bytes < decompressed_bytes["zip"] <= LIMITS.max_total_bytes + 1


def test_the_module_imports_nothing_heavy() -> None:
    probe = "import sys, app.inputs.archives\nprint([name for name in ('torch', 'numpy', 'safetensors') if name in sys.modules])\n"
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
