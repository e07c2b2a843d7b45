"""Downloading an adapter archive from an allowed URL: streamed, capped, no redirects."""

from collections.abc import Iterator
from pathlib import Path

import pytest
from starlette.applications import Starlette
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from tests.conftest import served
from workers.adapters.importer import _download
from workers.errors import JobFailed

PAYLOAD = bytes(range(256)) * 4096  # 1 MiB


@pytest.fixture(scope="module")
def file_host() -> Iterator[str]:
    async def archive(_request: object) -> Response:
        return Response(PAYLOAD, media_type="application/octet-stream")

    async def elsewhere(_request: object) -> Response:
        return RedirectResponse("http://169.254.169.254/latest/meta-data")

    with served(Starlette(routes=[Route("/adapter.tar", archive), Route("/moved.tar", elsewhere)])) as base_url:
        yield base_url


def test_an_archive_downloads_byte_for_byte(file_host: str, tmp_path: Path) -> None:
    assert _download(f"{file_host}/adapter.tar", tmp_path / "a.tar", max_bytes=len(PAYLOAD)).read_bytes() == PAYLOAD


def test_a_download_over_the_limit_stops_while_streaming(file_host: str, tmp_path: Path) -> None:
    with pytest.raises(JobFailed) as failure:
        _download(f"{file_host}/adapter.tar", tmp_path / "a.tar", max_bytes=len(PAYLOAD) // 2)
    assert failure.value.code == "too_large"
    assert (tmp_path / "a.tar").stat().st_size <= len(PAYLOAD) // 2


def test_a_redirect_is_not_followed(file_host: str, tmp_path: Path) -> None:
    with pytest.raises(JobFailed, match="307") as failure:
        _download(f"{file_host}/moved.tar", tmp_path / "a.tar", max_bytes=len(PAYLOAD))
    assert failure.value.code == "download_failed"
