"""Temporary paths that an interrupted command must not leave behind.

Writers register what they create (`track`) and unregister it once it is renamed into place or
removed (`untrack`). A normal exception unwinds through the writer's own `finally`; a hard exit
(the CLI's Ctrl-C handler ends the process at once, without unwinding through threads that may
be blocked in native code) calls `remove_tracked` first, and `remove_after_exit` just before
ending: the threads still writing (orbax's, TensorStore's) can recreate a directory removed
while they run, so a small process removes the paths again once this one is gone.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

_lock = threading.Lock()
_tracked: set[Path] = set()


def track(path: Path) -> None:
    with _lock:
        _tracked.add(path)


def untrack(path: Path) -> None:
    with _lock:
        _tracked.discard(path)


def remove_tracked() -> list[Path]:
    """Delete every tracked path (files or directories); errors are ignored. Returns them."""
    with _lock:
        paths = list(_tracked)
        _tracked.clear()
    for path in paths:
        _remove(path)
    return paths


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


# Waits until its parent (the exiting process) is gone, then removes the paths it was given
# (inline, as _remove does: importing this package would load JAX first).
# It inherits stdout/stderr, so a reader of the command's output sees end-of-file only after it.
_AFTER_EXIT = """
import os, shutil, sys, time
parent, paths = int(sys.argv[1]), sys.argv[2:]
while os.getppid() == parent:
    time.sleep(0.005)
for p in paths:
    if os.path.isdir(p) and not os.path.islink(p):
        shutil.rmtree(p, ignore_errors=True)
    elif os.path.lexists(p):
        os.unlink(p)
"""


def remove_after_exit(paths: list[Path]) -> None:
    """Start a process that removes `paths` once this process has exited (call right before
    `os._exit`); no-op for no paths."""
    if not paths:
        return
    try:
        subprocess.Popen(
            [sys.executable, "-c", _AFTER_EXIT, str(os.getpid()), *map(str, paths)],
            stdin=subprocess.DEVNULL,
        )
    except OSError:
        pass  # the next write to the same destination removes leftovers of dead processes
