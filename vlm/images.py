"""Turn whatever a user hands us (a path, bytes, a PIL image, an array) into a safe RGB image."""

from __future__ import annotations

import io
import os
import re
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import InputError
from .limits import current

# Images whose header claims more pixels than `Limits.max_image_pixels` (64 MP: any camera
# photo; VLM_MAX_IMAGE_PIXELS) are refused before decoding (decompression bombs). Pillow's own
# guard (`Image.MAX_IMAGE_PIXELS`, a process-wide setting left as the application set it)
# stays a second line of defence: it refuses what claims more than twice its limit as it opens.

# The most any task needs of an image: the encoders read at most 448 px and Explain's overlay
# is shown at about 1024. An image whose shorter side is at least twice this is reduced by a
# whole factor while it is decoded (JPEG at its decoder's scale, others right after), keeping
# that side at least this long: a 64 MP image costs a few MB afterwards, not 200.
WORK_SIDE = 1024

REDUCIBLE = {"RGB", "RGBA", "L", "LA", "I", "F"}  # modes Image.reduce takes

ORIENTATION = 0x0112  # the EXIF tag

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".heic"}
# ISO-BMFF brands of HEIC/HEIF files (iPhone photos), which Pillow reads only with a plugin
HEIF_BRANDS = {b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1"}

ImageInput = str | os.PathLike | bytes | Image.Image | np.ndarray


class ImageError(InputError):
    """An input that is not a usable image; the message says why, for the user."""


def _flatten_alpha(image: Image.Image) -> Image.Image:
    """Composite transparent images over white, so transparent pixels don't turn black."""
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode (16-bit, CMYK, palette, alpha) to 8-bit RGB."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        array = np.clip(array / peak * 255.0, 0, 255).astype(np.uint8)
        image = Image.fromarray(array, mode="L")
    elif image.mode == "F":
        array = np.asarray(image, dtype=np.float64)
        span = max(array.max() - array.min(), 1e-12)
        image = Image.fromarray(((array - array.min()) / span * 255).astype(np.uint8), mode="L")
    image = _flatten_alpha(image)
    return image if image.mode == "RGB" else image.convert("RGB")


def _image_array(array: np.ndarray, name: str) -> np.ndarray:
    """An [H, W] or [H, W, 1|3|4] numeric array as uint8 (floats in [0, 1] are scaled)."""
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    numeric = array.dtype == bool or np.issubdtype(array.dtype, np.number)
    shaped = array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))
    if not (numeric and shaped and array.size):
        raise ImageError(
            f"{name}: an array of shape {array.shape} and type {array.dtype} is not an image "
            "(expected height × width, with 1, 3 or 4 channels)"
        )
    if array.dtype != np.uint8:
        array = np.nan_to_num(array.astype(np.float64), nan=0.0, posinf=255.0, neginf=0.0)
        array = np.clip(array * (255 if array.max() <= 1.0 else 1), 0, 255).astype(np.uint8)
    return array


def _claimed(error: Image.DecompressionBombError, max_pixels: int) -> str:
    """The pixel count in Pillow's refusal ("Image size (N pixels) exceeds …"), formatted."""
    match = re.search(r"\((\d+) pixels\)", str(error))
    return f"{int(match.group(1)):,}" if match else f"more than {2 * max_pixels:,}"


def _open(source: str | os.PathLike | bytes, name: str) -> Image.Image:
    max_pixels = current().max_image_pixels
    if isinstance(source, bytes):
        if not source:
            raise ImageError(f"{name}: the file is empty")
        stream = io.BytesIO(source)
    else:
        path = Path(source)
        if not path.is_file():
            raise ImageError(f"{name}: no such file")
        if path.stat().st_size == 0:
            raise ImageError(f"{name}: the file is empty")
        stream = io.BytesIO(path.read_bytes())
    try:
        image = Image.open(stream)
    except Image.DecompressionBombError as error:  # over twice the limit: Pillow refused it
        raise ImageError(
            f"{name}: the image is too large ({_claimed(error, max_pixels)} pixels; "
            f"the limit is {max_pixels:,} pixels)"
        ) from None
    except UnidentifiedImageError:
        head = stream.getvalue()[:12]
        heif = head[4:8] == b"ftyp" and head[8:12] in HEIF_BRANDS
        if heif or Path(name).suffix.lower() in (".heic", ".heif"):
            raise ImageError(
                f"{name}: HEIC/HEIF images are not supported here (Pillow needs the "
                "pillow-heif plugin); convert it to JPEG or PNG"
            ) from None
        raise ImageError(f"{name}: not an image Pillow can read") from None
    width, height = image.size
    if width * height > max_pixels:
        raise ImageError(
            f"{name}: the image is too large ({width}×{height} pixels; "
            f"the limit is {max_pixels:,} pixels)"
        )
    return image


class PixelBudget:
    """How many pixels one request may decode in all ("Caption all", indexing): each image
    is charged what its decoder will produce (a JPEG at its reduced scale) before decoding,
    and one over the budget is refused with ImageError, so the request's decoding time is
    bounded whatever its count of files."""

    def __init__(self, pixels: int):
        self.left = pixels
        self._lock = threading.Lock()  # decode threads share one budget

    def charge(self, pixels: int, name: str) -> None:
        with self._lock:
            if pixels > self.left:
                raise ImageError(
                    f"{name}: not decoded, this request has used its budget of decoded "
                    "pixels (VLM_MAX_REQUEST_PIXELS); send the rest in another request"
                )
            self.left -= pixels


def _reduction(size: tuple[int, int], keep: int) -> int:
    """The whole factor that shrinks `size` most while its shorter side stays >= `keep`; 1
    below twice that."""
    return max(1, min(size) // keep)


def load_image(
    source: ImageInput,
    name: str | None = None,
    min_side: int | None = None,
    budget: PixelBudget | None = None,
) -> Image.Image:
    """Open `source` as an RGB PIL image: EXIF rotation applied, first frame of animations,
    alpha flattened onto white, 16-bit scaled. Raises ImageError with a readable message.

    Decoding never keeps more than the work needs: an image whose shorter side is at least
    2 × `WORK_SIDE` is reduced by a whole factor as it is decoded. `min_side` lets a JPEG
    decode at a reduced scale that keeps both sides at least that long (the model resizes to
    it anyway), which makes decoding big photos much faster. `budget` is charged the pixels
    the decoder will produce before it runs."""
    if isinstance(source, np.ndarray):
        return _to_rgb(Image.fromarray(_image_array(source, name or "image array")))
    if isinstance(source, Image.Image):
        image, label = source, name or getattr(source, "filename", "") or "image"
    else:
        label = name or ("image bytes" if isinstance(source, bytes) else Path(source).name)
        image = _open(source, label)
        if image.format == "JPEG":
            side = min_side or WORK_SIDE
            if _reduction(image.size, side) > 1 or min_side:
                image.draft("RGB", (side, side))
        if budget is not None:
            budget.charge(image.size[0] * image.size[1], label)
    try:
        if getattr(image, "is_animated", False):
            image.seek(0)
        image.load()
        if (factor := _reduction(image.size, WORK_SIDE)) > 1:
            # reduced in its own mode where Pillow can (no full-size copy), else made RGB first
            image = image if image.mode in REDUCIBLE else _to_rgb(image)
            image = image.reduce(factor)
        if image.getexif().get(ORIENTATION, 1) != 1:  # (exif_transpose copies even when not)
            image = ImageOps.exif_transpose(image)
        return _to_rgb(image)
    except (OSError, SyntaxError, ValueError) as error:
        raise ImageError(f"{label}: the image data is damaged or truncated ({error})") from None


def is_image_path(path: str | os.PathLike) -> bool:
    """True for file names with a common image extension."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def list_images(paths: list[str | os.PathLike]) -> list[Path]:
    """Expand folders into the image files below them (sorted), keep files as they are."""
    found: list[Path] = []
    for entry in map(Path, paths):
        if entry.is_dir():
            found.extend(p for p in sorted(entry.rglob("*")) if p.is_file() and is_image_path(p))
        else:
            found.append(entry)
    return found


class DecodedImages(torch.utils.data.Dataset):
    """Decode + preprocess images (for DataLoader workers or threads); item i is
    (i, pixels or None, error message), so one bad file never stops a batch."""

    def __init__(
        self,
        sources: Sequence[ImageInput],
        preprocess,
        side: int | None = None,
        budget: PixelBudget | None = None,
    ):
        self.sources = sources
        self.preprocess = preprocess
        self.side = side  # JPEGs decode straight at about this size (much faster)
        self.budget = budget  # decoded pixels, charged per image (see PixelBudget)

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, i: int):
        try:
            image = load_image(self.sources[i], min_side=self.side, budget=self.budget)
            return i, self.preprocess(image), ""
        except (ImageError, OSError) as error:
            return i, None, str(error)


def collate_decoded(batch):
    """DataLoader collate for `DecodedImages`: (indices, stacked pixels or None, errors)."""
    good = [(i, x) for i, x, _ in batch if x is not None]
    errors = [(i, e) for i, x, e in batch if x is None]
    pixels = torch.stack([x for _, x in good]) if good else None
    return [i for i, _ in good], pixels, errors
