"""The gate every image a request names passes, whatever its form, before anything decodes it.

A request can name an image as an uploaded file (Gradio's FileData, with or without its
`meta`), a server path, a URL or a `data:` URL. `ImageGate.open` takes any of them (and a
PIL image, an array or bytes, which are already in memory) and:

- reads a path only if it resolves, `..` and symlinks followed, inside the gate's roots, and
  refuses every other path with one message that does not depend on whether the file exists
  (no existence oracle);
- never fetches a URL;
- refuses a `data:` URL longer than the byte limit allows *before* decoding its base64;
- applies the same byte limit (`Limits.max_file_size`, as Gradio's uploads) to files and data
  URLs, then decodes with `vlm.images.load_image`, which checks the pixel count from the
  header before decoding (`Limits.max_image_pixels`).
"""

from __future__ import annotations

import base64
import binascii
import functools
import math
import os
import re
import urllib.parse
from collections.abc import Callable, Iterable
from pathlib import Path

from PIL import Image

from .errors import InputError
from .images import ImageError, PixelBudget, load_image
from .limits import current


class InputRefused(ImageError):
    """An input the server will not read (outside the roots, a URL, over a limit)."""


def _short(text: str, limit: int = 120) -> str:
    text = "".join(c if c.isprintable() else "?" for c in text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _megabytes(n: int) -> str:
    return f"{n / (1 << 20):,.1f} MB"


class PathGuard:
    """The server files a request may name by path: only those under `roots` (a list, or a
    function giving one, for folders known only later such as Gradio's upload folder).

    A path is resolved first (`..` removed, symlinks followed), so neither can lead out of a
    root; `~` is not expanded (it is the server's home, not the user's)."""

    def __init__(self, roots: Iterable[str | os.PathLike] | Callable[[], Iterable] = ()):
        self._roots = roots if callable(roots) else [Path(r).resolve() for r in roots]

    def roots(self) -> list[Path]:
        roots = self._roots() if callable(self._roots) else self._roots
        return [Path(r).resolve() for r in roots]

    def allows(self, path: str | os.PathLike) -> Path | None:
        """The resolved path if a request may read it, else None. Whether the file exists
        plays no part."""
        try:
            text = os.fspath(path)
        except TypeError:
            return None
        if not isinstance(text, str) or not text or "\x00" in text:
            return None
        try:
            resolved = Path(text).resolve()
        except (OSError, RuntimeError, ValueError):  # a symlink loop, a name too long, …
            return None
        return resolved if any(resolved.is_relative_to(r) for r in self.roots()) else None

    def check(self, path: str | os.PathLike) -> Path:
        """The resolved path, or InputRefused with the same message for any path outside,
        whether or not it exists."""
        resolved = self.allows(path)
        if resolved is None:
            shown = os.fspath(path) if isinstance(path, str | os.PathLike) else repr(path)
            raise InputRefused(
                f"The server does not read {_short(str(shown))!r}: it is outside the folders "
                "it may read from (uploads, the bundled examples and folders allowed with "
                "--allowed-dir). Upload the file instead."
            )
        return resolved


def url_refused(url: str) -> InputRefused:
    """The refusal for a URL: the server never fetches one for a request."""
    return InputRefused(
        f"The server does not fetch URLs ({_short(url, 200)!r}): download the image and "
        "upload it instead."
    )


def is_url(text: str) -> bool:
    """A URL with a scheme other than `data:` (http, https, ftp, file, …)."""
    return bool(re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", text))


def data_url_bytes(url: str, max_bytes: int | None = None, name: str = "data URL") -> bytes:
    """The bytes of a `data:` URL, refused by its encoded length before anything is decoded
    when they could exceed `max_bytes` (None: the file limit, `Limits.max_file_size`)."""
    max_bytes = current().max_file_size if max_bytes is None else max_bytes
    header, comma, payload = url.partition(",")
    if not comma or not header.lower().startswith("data:"):
        raise ImageError(f"{name}: not a valid data URL")
    encoded = header.lower().endswith(";base64")
    # base64 makes 3 bytes of 4 characters; a percent-encoded byte takes 1 to 3 characters
    decoded_at_least = len(payload) * 3 // 4 - 2 if encoded else math.ceil(len(payload) / 3)
    if decoded_at_least > max_bytes:
        raise InputRefused(
            f"{name}: the image is too large ({_megabytes(len(url))} as a data URL, about "
            f"{_megabytes(max(decoded_at_least, 0))} of data; the limit is "
            f"{_megabytes(max_bytes)})"
        )
    if not encoded:
        data = urllib.parse.unquote_to_bytes(payload)
    else:
        try:
            data = base64.b64decode(re.sub(r"\s+", "", payload), validate=True)
        except (binascii.Error, ValueError):
            raise ImageError(f"{name}: the data URL is not valid base64") from None
    if len(data) > max_bytes:
        raise InputRefused(
            f"{name}: the image is too large ({_megabytes(len(data))}; "
            f"the limit is {_megabytes(max_bytes)})"
        )
    return data


def _field(payload, key: str):
    if isinstance(payload, dict):
        return payload.get(key)
    return getattr(payload, key, None)


class ImageGate:
    """Opens an image a request names, whatever its form, within the guard's roots and the
    byte and pixel limits; see the module's docstring."""

    def __init__(self, guard: PathGuard, max_bytes: int | None = None):
        self.guard = guard
        self.max_bytes = current().max_file_size if max_bytes is None else max_bytes

    def read_path(self, path: str | os.PathLike) -> Path:
        """A path inside the roots, a regular file within the byte limit."""
        resolved = self.guard.check(path)
        name = resolved.name
        if not resolved.is_file():
            raise ImageError(f"{name}: no such file")
        size = resolved.stat().st_size
        if size > self.max_bytes:
            raise InputRefused(
                f"{name}: the file is too large ({_megabytes(size)}; the limit is "
                f"{_megabytes(self.max_bytes)})"
            )
        return resolved

    def open(
        self, source, name: str | None = None, budget: PixelBudget | None = None
    ) -> Image.Image:
        """An RGB image from `source`: a path (str or PathLike), a URL or data URL (str), a
        FileData-like dict or object (`path`, `url`, `orig_name`), bytes, a PIL image or an
        array, reduced while it is decoded to what the work needs (see `load_image`), charged
        to `budget` if given. Raises ImageError (InputRefused for what is refused) with a
        message for the user."""
        decode = functools.partial(load_image, budget=budget)
        if isinstance(source, str):
            if source.lower().startswith("data:"):
                return decode(data_url_bytes(source, self.max_bytes), name or "data URL")
            if is_url(source):
                raise url_refused(source)
            return decode(self.read_path(source), name)
        if isinstance(source, os.PathLike):
            return decode(self.read_path(source), name)
        if isinstance(source, bytes):
            if len(source) > self.max_bytes:
                raise InputRefused(
                    f"{name or 'image bytes'}: the image is too large "
                    f"({_megabytes(len(source))}; the limit is {_megabytes(self.max_bytes)})"
                )
            return decode(source, name)
        path, url = _field(source, "path"), _field(source, "url")
        if path is not None or url is not None:  # FileData / ImageData / a dict of them
            shown = Path(str(_field(source, "orig_name") or "image")).name
            if isinstance(path, str) and path:
                if is_url(path) or path.lower().startswith("data:"):
                    raise url_refused(path)
                return decode(self.read_path(path), name or shown)
            if isinstance(url, str) and url.lower().startswith("data:"):
                return decode(data_url_bytes(url, self.max_bytes, shown), name or shown)
            raise url_refused(str(url or path))
        return decode(source, name)  # a PIL image or an array, already in memory


def number(value, what: str, low: float, high: float, unit: str = "") -> float:
    """`value` as a finite float within [low, high], or ValueError: "{what} must be between
    {low} and {high}{unit}." (NaN and infinities included, which `int()` would choke on)."""
    try:
        result = float(value)
    except (TypeError, ValueError):
        result = math.nan
    if not (math.isfinite(result) and low <= result <= high):
        shown = (
            "" if isinstance(value, int | float) and math.isfinite(result) else f", not {value!r}"
        )
        raise InputError(f"{what} must be between {low:g} and {high:g}{unit}{shown}.")
    return result
