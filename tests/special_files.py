"""Calling code that must not block on a FIFO: run it in a thread, and if it is still
blocked after a while, fail the test after opening the FIFO's other end so the thread can
finish instead of hanging the test run."""

import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

WAIT_S = 20.0


def call_without_blocking(function: Callable[[], Any], fifos: list[Path], wait_s: float = WAIT_S) -> Any:
    """`function()`'s result, or the exception it raised; fails the test if it was still
    running after `wait_s` (blocked in an `open()` of one of `fifos`)."""
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["result"] = function()
        except BaseException as error:
            outcome["error"] = error

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(wait_s)
    if thread.is_alive():
        _release(fifos)
        thread.join(wait_s)
        pytest.fail(f"blocked for {wait_s} s on a FIFO")
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("result")


def _release(fifos: list[Path]) -> None:
    """Open each FIFO for writing and close it: a reader blocked in `open()` returns, reads an
    end of file, and its thread ends."""
    for fifo in fifos:
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass  # nobody is blocked on this one
