"""Where in an image a text matches: each window seen alone, contrasted with other texts.

For each cell of a grid over the image the encoder reads, everything but a window of
neighbouring cells around it is covered with the image's own background colour, and the map
holds how similar what is left is to the text (preservation, the complement of occlusion
sensitivity, Zeiler & Fergus 2014). One object alone in a window is read without the others
beside it, which a model that binds attributes loosely needs. Any content raises the
similarity to almost every text, so it is compared with the mean for a set of reference texts
(the model's labels): what is left is what matters for *this* text. It needs nothing of the
encoder but its image and text embeddings, so it works for ViT and ResNet towers alike.
docs/explain.md has the measurements against covering the window instead and against the
patch–text cosine.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from .encoder import Encoder

# texts to contrast with when a model has no label set of its own
GENERIC_REFERENCES = ("a photo", "an object", "a shape", "something", "a picture of a thing")


def background_colour(pixels: torch.Tensor) -> torch.Tensor:
    """Per-channel median of the border pixels of a [3, H, W] tensor: what 'nothing' looks
    like in this image (a constant grey would itself look like an object on black)."""
    border = torch.cat(
        [pixels[:, 0], pixels[:, -1], pixels[:, :, 0], pixels[:, :, -1]], dim=1
    )  # [3, 2H + 2W]
    return border.median(dim=1).values


def windowed(pixels: torch.Tensor, grid: int, window: int, keep: bool = True) -> torch.Tensor:
    """grid² copies of a [3, S, S] tensor, one per cell (r, c) at r*grid+c: with `keep`, only a
    window × window block of cells centred on the cell is left and the rest is filled with the
    background colour; without, that block is filled and the rest left: [grid², 3, S, S]."""
    side = pixels.shape[-1]
    fill = background_colour(pixels)[:, None, None]
    edges = [round(i * side / grid) for i in range(grid + 1)]
    before, after = (window - 1) // 2, window // 2
    copies = (fill if keep else pixels).expand(grid * grid, *pixels.shape).clone()
    for r in range(grid):
        top, bottom = edges[max(r - before, 0)], edges[min(r + after + 1, grid)]
        for c in range(grid):
            left, right = edges[max(c - before, 0)], edges[min(c + after + 1, grid)]
            block = pixels[:, top:bottom, left:right] if keep else fill
            copies[r * grid + c, :, top:bottom, left:right] = block
    return copies


def grid_size(encoder: Encoder) -> int:
    """The ViT's patch grid (7 for ViT-B/32 at 224 px); 7 for other towers."""
    patch = getattr(encoder.model.visual, "patch_size", None)
    if patch is None:
        return 7
    patch = patch[0] if isinstance(patch, tuple | list) else patch
    return max(encoder.image_side // int(patch), 1)


@torch.inference_mode()
def occlusion_map(
    encoder: Encoder,
    image: Image.Image,
    text: str,
    references: Sequence[str] = GENERIC_REFERENCES,
    window: int = 3,
    batch_size: int = 64,
    keep: bool = True,
) -> np.ndarray:
    """A [grid, grid] map of where `text` matches, less the mean for `references` (texts equal
    to `text` are left out of them). `keep=True`: how similar the image is to `text` with only
    the window around each cell left; `keep=False`: how much covering that window lowers the
    similarity (the map shipped before, docs/explain.md compares them)."""
    grid = grid_size(encoder)
    pixels = encoder.pixels([image])[0]
    copies = windowed(pixels, grid, window, keep)
    references = [r for r in references if r.strip().casefold() != text.strip().casefold()]
    texts = encoder.encode_text([text, *(references or GENERIC_REFERENCES)])  # [1 + R, D]
    shown = torch.cat(
        [
            encoder.encode_pixels(copies[i : i + batch_size], normalize=True)
            for i in range(0, len(copies), batch_size)
        ]
    )
    if not keep:  # the similarity each covered window takes away
        shown = encoder.encode_pixels(pixels[None], normalize=True) - shown
    similarity = shown @ texts.T  # [grid², 1 + R]
    relevance = similarity[:, 0] - similarity[:, 1:].mean(dim=1)
    return relevance.reshape(grid, grid).cpu().numpy()
