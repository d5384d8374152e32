"""Claims on the work items of a shared cache, so that several runs on one cache split the plan between them.

On a CPU, two runs with one thread each get through a plan faster than one run with two threads (the model's
matrices are small), so `python -m benchmarks.tasks --threads 1` may run once per core. Each expert and each row
is claimed by a file created exclusively beside it; a run skips what another live run holds, and takes over the
claim of a run that died (same machine, its process gone).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _holder() -> str:
    return f"{socket.gethostname()} {os.getpid()}"


def _dead(holder: str) -> bool:
    """Whether the claim's process is known to be gone (a claim from another machine is never taken over)."""
    host, _, pid = holder.rpartition(" ")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def _try_claim(path: Path) -> bool:
    try:
        descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    with os.fdopen(descriptor, "w") as file:
        file.write(_holder())
    return True


@contextmanager
def claim(path: Path) -> Iterator[bool]:
    """Yield True while this process holds the claim `path` (released on exit), False when a live run holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    mine = _try_claim(path)
    if not mine:
        try:
            holder: str | None = path.read_text()  # empty while its run is writing it: held
        except FileNotFoundError:  # released between the two calls
            holder = None
        if holder is None or _dead(holder):
            path.unlink(missing_ok=True)  # two runs taking over one dead claim at once may both score it: no harm
            mine = _try_claim(path)
    try:
        yield mine
    finally:
        if mine:
            path.unlink(missing_ok=True)
