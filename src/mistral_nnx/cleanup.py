"""Temporary paths that an interrupted command must not leave behind.

Writers register what they create (`track`) and unregister it once it is renamed into place or
removed (`untrack`). A normal exception unwinds through the writer's own `finally`; a hard exit
(the CLI's Ctrl-C handler ends the process at once, without unwinding through threads that may
be blocked in native code) calls `remove_tracked` first.
"""

from __future__ import annotations

import shutil
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


def remove_tracked() -> None:
    """Delete every tracked path (files or directories); errors are ignored."""
    with _lock:
        paths = list(_tracked)
        _tracked.clear()
    for path in paths:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
