"""The limits a server checks every request against, read once from the environment.

Every bound is a field of `Limits`, with its default and the `VLM_*` variable that sets it.
`Limits.from_env()` reads them all at once (a bad value is a ConfigError naming its
variable); `current()` is that reading, done on first use and kept, for code that is given
no `Limits` of its own (the image decoder, the CLI). Importing this module reads nothing.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from .errors import ConfigError

UNITS = {"B": 1, "KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30, "TB": 1 << 40}  # as Gradio's


def parse_size(size: str | int) -> int:
    """Bytes from "50mb", "1 GB", "2048" (Gradio's `max_file_size` syntax, 1024-based)."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+)\s*([A-Za-z]*)\s*", size)
    unit = (match.group(2) or "B").upper() if match else ""
    if not match or unit not in UNITS:
        raise ConfigError(f"not a size: {size!r} (e.g. 50mb)")
    return int(match.group(1)) * UNITS[unit]


def _setting(default, env: str | None, parse=int):
    return field(default=default, metadata={"env": env, "parse": parse})


@dataclass(frozen=True)
class Limits:
    """Every bound a request is checked against (sizes in bytes, ages in seconds)."""

    # inputs: bytes of one file or data URL (as Gradio's uploads), pixels a header may claim
    max_file_size: int = _setting(50 << 20, "VLM_MAX_FILE_SIZE", parse_size)
    max_image_pixels: int = _setting(64_000_000, "VLM_MAX_IMAGE_PIXELS")
    # pixels one request may decode in all ("Caption all", indexing; vlm.images.PixelBudget)
    max_request_pixels: int = _setting(500_000_000, "VLM_MAX_REQUEST_PIXELS")
    max_upload_files: int = _setting(500, "VLM_MAX_UPLOAD_FILES")
    # videos (also within max_file_size): length, a frame's pixels, frames sampled of one
    max_video_seconds: float = _setting(600.0, "VLM_MAX_VIDEO_SECONDS", float)
    max_video_frame_pixels: int = _setting(3840 * 2160, "VLM_MAX_VIDEO_PIXELS")
    max_video_frames: int = _setting(64, "VLM_MAX_VIDEO_FRAMES")
    # generation and texts, checked before any tokenising
    max_new_tokens: int = _setting(60, "VLM_MAX_NEW_TOKENS")
    max_labels: int = _setting(2000, "VLM_MAX_LABELS")
    max_label_chars: int = _setting(300, "VLM_MAX_LABEL_CHARS")  # also a phrase, a search text
    max_templates: int = _setting(100, "VLM_MAX_TEMPLATES")
    max_template_chars: int = _setting(200, "VLM_MAX_TEMPLATE_CHARS")
    max_classify_texts: int = _setting(20_000, "VLM_MAX_CLASSIFY_TEXTS")  # labels × templates
    max_question_chars: int = _setting(500, "VLM_MAX_QUESTION_CHARS")
    max_few_shot_chars: int = _setting(1000, "VLM_MAX_FEW_SHOT_CHARS")
    max_choices: int = _setting(50, None)
    max_chat_messages: int = _setting(40, "VLM_MAX_CHAT_MESSAGES")
    max_chat_images: int = _setting(8, "VLM_MAX_CHAT_IMAGES")
    # the server: requests one client may have waiting or running (vlm.admission.FairQueue),
    # a request body (None: the largest a legitimate request sends), the app's files on disk
    max_pending: int = _setting(4, "VLM_MAX_PENDING")
    max_body_size: int | None = _setting(None, "VLM_MAX_BODY_SIZE", parse_size)
    upload_quota: int = _setting(2 << 30, "VLM_UPLOAD_QUOTA", parse_size)
    # every file the app writes or takes in is removed this long after its last use
    temp_max_age: float = _setting(600.0, "VLM_TEMP_MAX_AGE", float)
    # sessions whose state Gradio keeps (API clients never close theirs)
    max_sessions: int = _setting(256, "VLM_MAX_SESSIONS")
    # training from the page (vlm.training.jobs)
    train_max_images: int = _setting(2000, "VLM_TRAIN_MAX_IMAGES")
    train_max_steps: int = _setting(2000, "VLM_TRAIN_MAX_STEPS")
    train_max_seconds: float = _setting(900.0, "VLM_TRAIN_MAX_SECONDS", float)
    train_max_zip: int = _setting(200_000_000, None)  # bytes unpacked
    train_max_queued: int = _setting(8, None)
    train_threads: int = _setting(1, "VLM_TRAIN_THREADS")
    train_max_age: float = _setting(3600.0, "VLM_TRAIN_MAX_AGE", float)

    def __post_init__(self):
        if self.max_body_size is None:
            object.__setattr__(self, "max_body_size", self.largest_request_bytes())

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Limits:
        """The defaults, with each `VLM_*` variable that is set (and not empty) read over
        its own."""
        environ = os.environ if environ is None else environ
        values = {}
        for setting in dataclasses.fields(cls):
            env = setting.metadata["env"]
            text = environ.get(env, "").strip() if env else ""
            if text:
                try:
                    values[setting.name] = setting.metadata["parse"](text)
                except (ValueError, ConfigError):
                    raise ConfigError(f"{env}={text!r} is not a valid setting") from None
        return cls(**values)

    def largest_request_bytes(self) -> int:
        """The largest body a legitimate request sends: one image inline as a data URL at the
        file limit (base64: 4 bytes for 3) beside the longest texts the limits allow, each
        character escaped in JSON at worst as 6 bytes, plus 1 MB for the rest. Several large
        images go through the upload route, one file at a time."""
        texts = (
            self.max_labels * (self.max_label_chars + 4)
            + self.max_templates * (self.max_template_chars + 2)
            + 5 * self.max_few_shot_chars
            + self.max_question_chars
        )
        return self.max_file_size * 4 // 3 + 6 * texts + (1 << 20)

    @staticmethod
    def variables() -> dict[str, str]:
        """Each variable that sets a limit → the field it sets."""
        fields = dataclasses.fields(Limits)
        return {f.metadata["env"]: f.name for f in fields if f.metadata["env"]}


@functools.cache
def current() -> Limits:
    """The environment's limits, read on first use and kept for the process."""
    return Limits.from_env()
