"""Report pictures and pages are rendered once and kept beside their report in the
artifact store: a report never changes once written, and rendering takes matplotlib a
few hundred milliseconds, which many readers (or several gateways) should not each pay.
The key carries the renderer's version, so a change in the drawing code draws anew."""

from collections.abc import Callable

from app.storage import ArtifactStore

RENDER_VERSION = 2


def cached_render(artifacts: ArtifactStore, folder: str, name: str, render: Callable[[], bytes]) -> bytes:
    key = f"{folder}/rendered/v{RENDER_VERSION}/{name}"
    try:
        return artifacts.read_bytes(key)
    except FileNotFoundError:
        pass
    content = render()
    artifacts.write_bytes(key, content)  # atomic: a concurrent reader sees all of it or none
    return content
