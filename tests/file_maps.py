"""Which memory mappings of a file this process holds (for the zero-copy loading tests)."""

from __future__ import annotations

import os
from pathlib import Path


def file_maps(path: str | os.PathLike[str]) -> list[tuple[int, int, int]]:
    """(start, end, file offset) of every mapping of `path` in this process, from
    /proc/self/maps (a param whose buffer lies in one is the file's page-cache pages)."""
    real = os.path.realpath(Path(path))
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].rstrip("\n") == real:
                lo, hi = (int(x, 16) for x in fields[0].split("-"))
                out.append((lo, hi, int(fields[2], 16)))
    return out
