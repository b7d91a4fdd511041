"""Pictures made from model outputs: a heatmap laid over an image."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw


def _colormap(values: np.ndarray) -> np.ndarray:
    """A perceptually ordered blue→yellow→red ramp for values in [0, 1], as uint8 RGB."""
    stops = np.array([[40, 20, 120], [30, 120, 220], [60, 200, 120], [250, 220, 40], [230, 40, 30]])
    stops = stops.astype(np.float32)
    position = np.clip(values, 0, 1).astype(np.float32) * (len(stops) - 1)
    low = np.floor(position).astype(np.intp).clip(0, len(stops) - 2)
    frac = (position - low)[..., None]
    return (stops[low] * (1 - frac) + stops[low + 1] * frac).astype(np.uint8)


def peak_centre(grid: np.ndarray, size: tuple[int, int]) -> tuple[float, float]:
    """(x, y) in pixels of an image of `size` at the centre of the grid's highest cell."""
    row, col = np.unravel_index(int(np.argmax(grid)), grid.shape)
    return (col + 0.5) * size[0] / grid.shape[1], (row + 0.5) * size[1] / grid.shape[0]


def overlay_heatmap(
    image: Image.Image,
    grid: np.ndarray,
    alpha: float = 0.55,
    mark_peak: bool = True,
    max_side: int = 1024,
) -> Image.Image:
    """`grid` (any shape, e.g. 7×7 patch scores) stretched over `image`, min-max scaled; with
    `mark_peak`, a ring around the centre of its highest cell (where the text matches most).
    The picture is drawn at most `max_side` pixels long (its colours as uint8, the ramp's
    working values float32): what a page shows, whatever the image's size."""
    if max(image.size) > max_side:
        image = image.copy()
        image.thumbnail((max_side, max_side))
    span = float(grid.max() - grid.min())
    scaled = (grid - grid.min()) / span if span > 1e-8 else np.zeros_like(grid)
    small = Image.fromarray((scaled * 255).astype(np.uint8), mode="L")
    smooth = np.asarray(small.resize(image.size, Image.BICUBIC), dtype=np.float32) / 255.0
    heat = Image.fromarray(_colormap(smooth))
    picture = Image.blend(image.convert("RGB"), heat, alpha)
    if mark_peak and span > 1e-8:
        x, y = peak_centre(grid, picture.size)
        r = max(4.0, min(picture.size) / grid.shape[0] / 2)
        draw = ImageDraw.Draw(picture)
        for colour, width in (((0, 0, 0), 4), ((255, 255, 255), 2)):  # visible on any colour
            draw.ellipse([x - r, y - r, x + r, y + r], outline=colour, width=width)
    return picture
