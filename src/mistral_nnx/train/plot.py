"""A loss curve as a PNG with numpy and zlib alone (no plotting dependency): axes, a light grid
(quarters of each range), the training loss in blue and eval points in red."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np

W, H, MARGIN = 640, 360, 30


def _png(pixels: np.ndarray) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    h, w, _ = pixels.shape
    raw = b"".join(b"\x00" + pixels[y].tobytes() for y in range(h))
    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def _line(img: np.ndarray, p: tuple[float, float], q: tuple[float, float], color: tuple) -> None:
    n = int(max(abs(q[0] - p[0]), abs(q[1] - p[1]))) + 1
    xs = np.linspace(p[0], q[0], n).round().astype(int)
    ys = np.linspace(p[1], q[1], n).round().astype(int)
    for dx in (0, 1):
        img[np.clip(ys + dx, 0, H - 1), np.clip(xs, 0, W - 1)] = color


def loss_curve_png(log: Path, png: Path) -> Path:
    """Plot the "loss" (and "eval_loss") records of a run's log.jsonl into `png`."""
    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    train = np.array([(r["step"], r["loss"]) for r in records if "loss" in r], float)
    evals = np.array([(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r], float)
    points = np.concatenate([a for a in (train, evals) if len(a)])
    (x0, y0), (x1, y1) = points.min(0), points.max(0)
    x1, y1 = max(x1, x0 + 1), max(y1, y0 + 1e-6)

    def to_px(x: float, y: float) -> tuple[float, float]:
        return (
            MARGIN + (x - x0) / (x1 - x0) * (W - 2 * MARGIN),
            H - MARGIN - (y - y0) / (y1 - y0) * (H - 2 * MARGIN),
        )

    img = np.full((H, W, 3), 255, np.uint8)
    for i in range(1, 5):
        gx, gy = MARGIN + i * (W - 2 * MARGIN) / 4, MARGIN + (i - 1) * (H - 2 * MARGIN) / 4
        _line(img, (gx, MARGIN), (gx, H - MARGIN), (225, 225, 225))
        _line(img, (MARGIN, gy), (W - MARGIN, gy), (225, 225, 225))
    _line(img, (MARGIN, H - MARGIN), (W - MARGIN, H - MARGIN), (0, 0, 0))
    _line(img, (MARGIN, MARGIN), (MARGIN, H - MARGIN), (0, 0, 0))
    for a, b in zip(train[:-1], train[1:], strict=True):
        _line(img, to_px(*a), to_px(*b), (31, 119, 180))
    for x, y in evals:
        px, py = (int(v) for v in to_px(x, y))
        img[max(py - 3, 0) : py + 4, max(px - 3, 0) : px + 4] = (214, 39, 40)
    png.write_bytes(_png(img))
    return png
