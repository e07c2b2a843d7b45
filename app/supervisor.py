"""`confprobe serve`, `gateway` and `worker`: the service's own processes. `serve` runs them
all on one machine (an embedded Redis unless REDIS_URL is set, the gateway and one worker)
and supervises them: a part that exits is restarted, and Ctrl-C stops them in order."""

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING

import click

from app.settings import get_settings

if TYPE_CHECKING:
    from app.settings import Settings


@click.command()
@click.option("--host", default=None, help="Address to listen on (default: HOST setting).")
@click.option("--port", type=int, default=None, help="Port to listen on (default: PORT setting).")
def gateway(host: str | None, port: int | None) -> None:
    """Run the HTTP gateway alone (migrates the registry first)."""
    import uvicorn

    from app import logs
    from app.registry.database import migrate as upgrade

    settings = get_settings()
    logs.configure(settings)
    upgrade(settings.resolved_database_url)
    uvicorn.run(
        "app.main:create_app",
        factory=True,
        host=host or settings.host,
        port=port or settings.port,
        log_level=settings.log_level,
        log_config=None,
    )


@click.command()
@click.option("--burst", is_flag=True, help="Stop when the queue is empty.")
def worker(burst: bool) -> None:
    """Run one worker on WORKER_DEVICE."""
    from workers.main import run_worker

    run_worker(burst=burst)


SERVE_RESTART_MAX_PAUSE_S = 10.0


def _confprobe_process(command: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    """`confprobe <command>` as a child in its own process group, so Ctrl-C reaches it only
    through `serve`."""
    return subprocess.Popen([sys.executable, "-m", "app.cli", *command], env=env, process_group=0)


@dataclass
class Part:
    """One process `serve` keeps running, and when it last exited by itself: a part that exits
    is started again after a pause that doubles with each recent exit, until it has exited
    `limit` times within the window."""

    name: str
    start: Callable[[], subprocess.Popen[bytes]]
    process: subprocess.Popen[bytes] | None = None
    exits: list[float] = field(default_factory=list)
    last_code: int | None = None
    restart_at: float | None = None

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def exited(self, now: float, window_s: float) -> int:
        """Record an exit; the number of exits within the window, this one included."""
        if self.process is not None:  # else it failed to start, and keeps its last code
            self.last_code = self.process.returncode
        self.exits = [at for at in self.exits if now - at < window_s] + [now]
        self.process = None
        return len(self.exits)

    def restart_pause_s(self) -> float:
        return float(min(0.5 * 2 ** (len(self.exits) - 1), SERVE_RESTART_MAX_PAUSE_S))


def start_part(part: Part) -> bool:
    """Start `part`; whether it started (embedded Redis may fail to answer)."""
    try:
        part.process = part.start()
    except (OSError, RuntimeError) as exc:
        click.echo(f"{part.name} did not start: {exc}", err=True)
        return False
    return True


@click.command()
@click.option("--host", default=None, help="Address to listen on (default: HOST setting).")
@click.option("--port", type=int, default=None, help="Port to listen on (default: PORT setting).")
def serve(host: str | None, port: int | None) -> None:
    """Start everything on this machine: an embedded Redis (unless REDIS_URL is set), the
    gateway and one worker. A part that exits by itself is started again (after 0.5 s, doubling
    with each recent exit up to 10 s) unless it exited SERVE_RESTART_LIMIT times within
    SERVE_RESTART_WINDOW_S; then everything stops. Ctrl-C stops them all: the gateway and the
    worker first (the worker finishes the job it is running; Ctrl-C again stops it at once),
    Redis last."""
    import socket

    from app import broker
    from app.registry.database import migrate as upgrade

    settings = get_settings()
    settings.var_dir.mkdir(parents=True, exist_ok=True)
    # Each child has its own process group, so Ctrl-C in the terminal reaches only this
    # process, which stops the children in order: Redis must outlive the worker's last job.
    redis_part: Part | None = None
    services: list[Part] = []

    def stop_services(at_once: bool) -> None:
        for part in services:
            if part.running():
                assert part.process is not None
                # killed at once, the worker's job is started again on the next start
                part.process.kill() if at_once else part.process.send_signal(signal.SIGTERM)

    requests = 0

    def on_signal(_signum: int, _frame: object) -> None:
        nonlocal requests
        requests += 1
        if requests == 1:
            click.echo("stopping: the worker finishes the job it is running (Ctrl-C again to stop at once)", err=True)
        stop_services(at_once=requests > 1)

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # SIGHUP: its terminal closed
        signal.signal(signum, on_signal)
    gave_up: Part | None = None
    try:
        env = dict(os.environ)
        if not settings.worker_name:
            # one name for every life of the worker: a restarted worker keeps its own queue, and
            # the job its killed predecessor left running is taken back and run again
            env["WORKER_NAME"] = f"{socket.gethostname()}.serve-{os.getpid()}"
        if not settings.redis_url:
            redis_part = Part(
                "embedded Redis", lambda: broker.start_embedded_redis(settings.embedded_redis_socket, process_group=0)
            )
            redis_part.process = redis_part.start()
            env["REDIS_URL"] = settings.resolved_redis_url
            click.echo(f"embedded Redis on {settings.embedded_redis_socket}")
        upgrade(settings.resolved_database_url)
        listen = ["--host", host or settings.host, "--port", str(port or settings.port)]
        for name, command in (("worker", ["worker"]), ("gateway", ["gateway", *listen])):
            part = Part(name, partial(_confprobe_process, command, env))
            if not requests:
                part.process = part.start()
            services.append(part)
        if not requests:
            click.echo(
                f"gateway on http://{host or settings.host}:{port or settings.port} (docs at /docs); Ctrl-C stops"
            )
        gave_up = supervise([*([redis_part] if redis_part else []), *services], settings, lambda: requests > 0)
        if gave_up is not None:  # a part keeps exiting: stop the others
            stop_services(at_once=False)
        while any(part.running() for part in services):
            time.sleep(0.2)
    finally:
        for part in services:  # only left running if this process is being torn down
            if part.running():
                assert part.process is not None
                part.process.kill()
        if redis_part is not None and redis_part.running():
            assert redis_part.process is not None
            redis_part.process.terminate()  # saves the queue to disk on the way out
            try:
                redis_part.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                redis_part.process.kill()
    if gave_up is not None:
        raise SystemExit(
            f"stopped because the {gave_up.name} exited {len(gave_up.exits)} times within {settings.serve_restart_window_s:g} s "
            f"(last exit code {gave_up.last_code})"
        )


def supervise(parts: list[Part], settings: "Settings", stopping: Callable[[], bool]) -> Part | None:
    """Keep `parts` running until `stopping()`: restart each that exits, after its pause. The
    part that exited too often, if one did (then the caller stops the rest)."""
    while not stopping():
        now = time.monotonic()
        for part in parts:
            if part.restart_at is None and not part.running():
                exits = part.exited(now, settings.serve_restart_window_s)
                if exits >= settings.serve_restart_limit:
                    click.echo(
                        f"{part.name} exited with code {part.last_code}, {exits} times within {settings.serve_restart_window_s:g} s: giving up",
                        err=True,
                    )
                    return part
                pause = part.restart_pause_s()
                click.echo(f"{part.name} exited with code {part.last_code}; restarting it in {pause:g} s", err=True)
                part.restart_at = now + pause
            elif part.restart_at is not None and now >= part.restart_at and not stopping():
                part.restart_at = None
                if start_part(part):
                    click.echo(f"restarted {part.name} (exit code {part.last_code})", err=True)
        time.sleep(0.2)
    return None


COMMANDS: tuple[click.Command, ...] = (gateway, worker, serve)
