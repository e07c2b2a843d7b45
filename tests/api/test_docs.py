"""The docs UI works with no internet: its assets come from installed packages."""

import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest

from app.main import create_app
from app.settings import Settings
from tests.conftest import require, served

CDN_HOSTS = ("cdn.jsdelivr.net", "unpkg.com", "cdnjs.cloudflare.com", "fonts.googleapis.com")


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_pages_load_their_assets_from_this_server(api: Any, page: str) -> None:
    html = api.get(page).text
    assert not any(host in html for host in CDN_HOSTS)
    assets = re.findall(r'(?:src|href)="(/[^"]+\.(?:js|css))"', html)
    assert assets
    for asset in assets:
        assert api.get(asset).status_code == 200, asset


def test_openapi_documents_every_route_and_the_error_envelope(api: Any) -> None:
    spec = api.get("/openapi.json").json()
    assert {
        "/v1/models",
        "/v1/models/{model_id}",
        "/v1/jobs",
        "/v1/jobs/{job_id}",
        "/v1/jobs/{job_id}/cancel",
        "/v1/jobs/{job_id}/events",
        "/readyz",
    } <= set(spec["paths"])
    unprocessable = spec["paths"]["/v1/models"]["post"]["responses"]["422"]["content"]["application/json"]["schema"]
    assert unprocessable == {"$ref": "#/components/schemas/ErrorOut"}


@pytest.fixture
def live_gateway(settings: Settings) -> Iterator[str]:
    with served(create_app(settings)) as base_url:
        yield base_url


def headless_chromium() -> str:
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    require(browser is not None, "Chromium is not installed (Debian package `chromium`)")
    assert browser
    return browser


@pytest.mark.slow
def test_docs_render_every_operation_in_headless_chromium(live_gateway: str) -> None:
    browser = headless_chromium()
    with tempfile.TemporaryDirectory() as profile:
        result = subprocess.run(
            [
                browser,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--no-first-run",
                "--disable-sync",
                f"--user-data-dir={profile}",
                "--virtual-time-budget=15000",
                "--dump-dom",
                f"{live_gateway}/docs",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
    rendered = set(re.findall(r'class="opblock-summary-path" data-path="([^"]+)"', result.stdout))
    assert {
        "/healthz",
        "/readyz",
        "/v1/models",
        "/v1/models/{model_id}",
        "/v1/jobs",
        "/v1/jobs/{job_id}",
        "/v1/jobs/{job_id}/cancel",
        "/v1/jobs/{job_id}/events",
    } <= rendered
