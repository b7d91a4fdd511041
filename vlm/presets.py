"""The one registry of named models: where each one's weights live and how it loads."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from .paths import ASSETS

SHAPEWORLD_DIR = ASSETS / "shapeworld"


@dataclasses.dataclass(frozen=True)
class Preset:
    """A named model. `folder`: a saved pipeline shipped with vlm. `clipcap`: a ClipCap
    checkpoint file in a hub repo (`repo_id`, `filename`) or a local file (`env` names the
    variable that holds its path), loaded with `load_clipcap(**clipcap)`."""

    name: str
    description: str
    folder: Path | None = None
    repo_id: str | None = None
    filename: str | None = None
    env: str | None = None
    clipcap: dict = dataclasses.field(default_factory=dict)
    # every (repo, file) the model needs from the hub, to tell whether it runs offline
    hub_files: tuple[tuple[str, str], ...] = ()

    def checkpoint(self) -> str:
        if self.env:
            path = os.environ.get(self.env)
            if not path or not Path(path).is_file():
                raise FileNotFoundError(
                    f"{self.name}: set {self.env} to the path of its checkpoint file "
                    f"(it is published on Google Drive, not on the Hugging Face hub)"
                )
            return path
        from huggingface_hub import hf_hub_download

        return hf_hub_download(self.repo_id, self.filename)

    def is_cached(self) -> bool:
        """True when everything it needs is already on this machine (no network needed)."""
        if self.folder is not None:
            return (self.folder / "config.json").is_file()
        if self.env:
            return bool(os.environ.get(self.env)) and Path(os.environ[self.env]).is_file()
        from huggingface_hub import try_to_load_from_cache

        return all(
            isinstance(try_to_load_from_cache(repo, file), str) for repo, file in self.hub_files
        )

    def load(self, device=None):
        from .pipeline import Pipeline

        if self.folder is not None:
            return Pipeline.from_pretrained(self.folder, device=device)
        return Pipeline.from_clipcap(
            self.checkpoint(), name=self.name, device=device, **self.clipcap
        )


_GPT2 = "openai-community/gpt2"
# GPT-2's config and tokenizer; ClipCap checkpoints carry the weights themselves
_GPT2_FILES = tuple((_GPT2, f) for f in ("config.json", "vocab.json", "merges.txt"))

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            name="clipcap-coco",
            description="ClipCap (MLP mapper, fine-tuned GPT-2) trained on COCO captions",
            repo_id="akhaliq/CLIP-prefix-captioning-COCO-weights",
            filename="coco_weights.pt",
            clipcap=dict(encoder={"model": "ViT-B-32-quickgelu", "pretrained": "openai"}, lm=_GPT2),
            hub_files=(
                ("akhaliq/CLIP-prefix-captioning-COCO-weights", "coco_weights.pt"),
                ("timm/vit_base_patch32_clip_224.openai", "open_clip_pytorch_model.bin"),
                *_GPT2_FILES,
            ),
        ),
        Preset(
            name="clipcap-coco-transformer",
            description="ClipCap (transformer mapper, frozen GPT-2, CLIP RN50x4) on COCO",
            env="VLM_CLIPCAP_TRANSFORMER_WEIGHTS",
            clipcap=dict(encoder={"model": "RN50x4", "pretrained": "openai"}, lm=_GPT2),
        ),
        Preset(
            name="shapeworld",
            description="Small CLIP + GPT-2 + prefix mapper trained on ShapeWorld (bundled)",
            folder=SHAPEWORLD_DIR,
        ),
    )
}


def available_presets() -> list[str]:
    """Names of the presets that can load on this machine right now without a download."""
    return [name for name, preset in PRESETS.items() if preset.is_cached()]


def hub_reachable(timeout: float = 2.0) -> bool:
    """Whether the Hugging Face hub answers within `timeout` seconds (never when offline)."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def choose_default_model(preferred: str = "clipcap-coco") -> tuple[str, str]:
    """The model to serve when none is named, and why: ClipCap when its weights are cached
    or the hub answers quickly, else the bundled ShapeWorld model."""
    if PRESETS[preferred].is_cached():
        return preferred, f"{preferred} is in the local Hugging Face cache"
    if hub_reachable():
        return preferred, f"{preferred} is downloaded from the Hugging Face hub"
    reason = (
        "HF_HUB_OFFLINE is set"
        if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
        else "the Hugging Face hub is not reachable"
    )
    return "shapeworld", f"{preferred} is not cached and {reason}, so the bundled model runs"
