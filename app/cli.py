"""`confprobe`: run the service (`serve`: embedded Redis + gateway + one worker), or one
part of it (`gateway`, `worker`), or migrate the registry (`migrate`)."""

import os
import signal
import subprocess
import sys
import time

import click

from app.settings import get_settings


@click.group()
def main() -> None:
    """Confidence Probing Service."""


@main.command()
def migrate() -> None:
    """Bring the registry database to the newest schema."""
    from app.registry.database import migrate as upgrade

    settings = get_settings()
    upgrade(settings.resolved_database_url)
    click.echo(f"registry at {settings.resolved_database_url} is up to date")


@main.command()
@click.option("--host", default=None, help="Address to listen on (default: HOST setting).")
@click.option("--port", type=int, default=None, help="Port to listen on (default: PORT setting).")
def gateway(host: str | None, port: int | None) -> None:
    """Run the HTTP gateway alone (migrates the registry first)."""
    import uvicorn

    from app.registry.database import migrate as upgrade

    settings = get_settings()
    upgrade(settings.resolved_database_url)
    uvicorn.run("app.main:create_app", factory=True, host=host or settings.host, port=port or settings.port, log_level=settings.log_level)


@main.command()
@click.option("--burst", is_flag=True, help="Stop when the queue is empty.")
def worker(burst: bool) -> None:
    """Run one worker on WORKER_DEVICE."""
    from workers.main import run_worker

    run_worker(burst=burst)


@main.command()
@click.option("--host", default=None, help="Address to listen on (default: HOST setting).")
@click.option("--port", type=int, default=None, help="Port to listen on (default: PORT setting).")
def serve(host: str | None, port: int | None) -> None:
    """Start everything on this machine: an embedded Redis (unless REDIS_URL is set), the
    gateway and one worker. Ctrl-C stops them all."""
    from app import broker
    from app.registry.database import migrate as upgrade

    settings = get_settings()
    settings.var_dir.mkdir(parents=True, exist_ok=True)
    children: list[subprocess.Popen[bytes]] = []
    env = dict(os.environ)
    if not settings.redis_url:
        children.append(broker.start_embedded_redis(settings.embedded_redis_socket))
        env["REDIS_URL"] = settings.resolved_redis_url
        click.echo(f"embedded Redis on {settings.embedded_redis_socket}")
    upgrade(settings.resolved_database_url)
    listen = ["--host", host or settings.host, "--port", str(port or settings.port)]
    children.append(subprocess.Popen([sys.executable, "-m", "app.cli", "worker"], env=env))
    children.append(subprocess.Popen([sys.executable, "-m", "app.cli", "gateway", *listen], env=env))
    click.echo(f"gateway on http://{host or settings.host}:{port or settings.port} (docs at /docs); Ctrl-C stops")

    stopping = False

    def stop(_signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    while not stopping and all(child.poll() is None for child in children):
        time.sleep(0.2)
    for child in reversed(children):
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 15
    for child in reversed(children):
        try:
            child.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
    failed = [child.args for child in children if child.returncode not in (0, -signal.SIGTERM, -signal.SIGINT)]
    if failed and not stopping:
        raise SystemExit(f"stopped because a part exited: {failed[0]}")


if __name__ == "__main__":
    main()
