"""A tiny 5x7 bitmap font drawn with numpy blocks (no Pillow, no font files)."""

from __future__ import annotations

import numpy as np

_GLYPHS: dict[str, tuple[str, ...]] = {
    "0": ("01110", "10001", "10011", "10101", "11001", "10001", "01110"),
    "1": ("00100", "01100", "00100", "00100", "00100", "00100", "01110"),
    "2": ("01110", "10001", "00001", "00010", "00100", "01000", "11111"),
    "3": ("11110", "00001", "00001", "01110", "00001", "00001", "11110"),
    "4": ("00010", "00110", "01010", "10010", "11111", "00010", "00010"),
    "5": ("11111", "10000", "11110", "00001", "00001", "10001", "01110"),
    "6": ("00110", "01000", "10000", "11110", "10001", "10001", "01110"),
    "7": ("11111", "00001", "00010", "00100", "01000", "01000", "01000"),
    "8": ("01110", "10001", "10001", "01110", "10001", "10001", "01110"),
    "9": ("01110", "10001", "10001", "01111", "00001", "00010", "01100"),
    ".": ("00000", "00000", "00000", "00000", "00000", "01100", "01100"),
    ":": ("00000", "01100", "01100", "00000", "01100", "01100", "00000"),
    "s": ("00000", "00000", "01110", "10000", "01110", "00001", "11110"),
    "#": ("01010", "01010", "11111", "01010", "11111", "01010", "01010"),
    " ": ("00000",) * 7,
}
GLYPH_W, GLYPH_H = 5, 7

_MASKS = {ch: np.array([[c == "1" for c in row] for row in rows], dtype=bool) for ch, rows in _GLYPHS.items()}


def text_mask(text: str, scale: int) -> np.ndarray:
    """Boolean mask of `text` rendered at `scale` pixels per font dot, one dot of spacing."""
    cols = []
    for ch in text:
        glyph = _MASKS.get(ch, _MASKS[" "])
        cols.append(glyph)
        cols.append(np.zeros((GLYPH_H, 1), dtype=bool))
    mask = np.hstack(cols[:-1]) if cols else np.zeros((GLYPH_H, 0), dtype=bool)
    return np.kron(mask, np.ones((scale, scale), dtype=bool))


def draw_text(plane: np.ndarray, text: str, x: int, y: int, scale: int, fg: int = 235, bg: int = 16) -> None:
    """Draw `text` onto a luma plane in place, on a dark box (clipped to the plane)."""
    mask = text_mask(text, scale)
    pad = scale
    h, w = mask.shape
    y0, x0 = max(y - pad, 0), max(x - pad, 0)
    y1, x1 = min(y + h + pad, plane.shape[0]), min(x + w + pad, plane.shape[1])
    plane[y0:y1, x0:x1] = bg
    mh, mw = min(h, plane.shape[0] - y), min(w, plane.shape[1] - x)
    if mh > 0 and mw > 0:
        region = plane[y : y + mh, x : x + mw]
        region[mask[:mh, :mw]] = fg


def text_box(text: str, x: int, y: int, scale: int) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1) of the box `draw_text` paints, before clipping."""
    h, w = text_mask(text, scale).shape
    return y - scale, y + h + scale, x - scale, x + w + scale
