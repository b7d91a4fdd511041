"""What a pipeline folder's `config.json` holds, and the parts a pipeline is built from."""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Iterable
from typing import Any, NamedTuple

from .errors import ConfigError
from .prompts import QUESTION_TEMPLATE

CONFIG_NAME = "config.json"
MAPPER_WEIGHTS = "mapper.safetensors"


@dataclasses.dataclass
class PipelineConfig:
    """What `config.json` in a pipeline folder holds."""

    encoder: dict  # {"model": open_clip name or "local-dir:encoder", "pretrained": tag or path}
    mapper: dict  # PrefixMapper keyword arguments
    lm: str = "lm"  # a subfolder of the pipeline folder, or a hub id
    name: str = ""
    caption_prompt: str = ""  # text between the prefix and the caption (ClipCap: none)
    question_template: str = QUESTION_TEMPLATE
    stop: list[str] = dataclasses.field(default_factory=list)  # extra strings that end a text
    templates: list[str] | None = None  # zero-shot prompts; None: OpenAI's 80 ImageNet ones
    # how templates combine: "mean" averages each label's prompt embeddings (CLIP's ensemble);
    # "sum" treats each prompt as a sub-class and adds probabilities, for templates that
    # enumerate the forms a label takes (ShapeWorld: "a small {}", "a large {}")
    template_pooling: str = "mean"
    label_sets: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    # what the weights were trained for (vlm.tasks.TASKS); None: every task
    tasks: list[str] | None = None
    # the decode (mapper + LM): "fp32" runs each weight in its loaded dtype, as published;
    # "mixed" autocasts to bf16/fp16 on a GPU (faster, may change tokens); see vlm.device
    precision: str = "fp32"
    # BLIP-2's prompt format: the text after an image is tokenized with the tokenizer's special
    # tokens (as Blip2Processor does: OPT's BOS), an image with no text after it gets the LM's BOS
    bos_after_image: bool = False
    family: str = "vlm"  # "vlm": this folder layout; "blip2": transformers' BLIP-2 layout
    # what its training images showed, in a few words, for "unlike anything it was trained on"
    trained_on: str = ""
    # a video as frame lines: the model writes each sampled frame's line after the frame's
    # prefix and timestamp (its objects and where they are), then reads the lines as text
    # to say what happened (docs/video-lab.md); False: the frames' prefixes themselves
    video_frame_lines: bool = False

    @classmethod
    def from_dict(cls, data: dict) -> PipelineConfig:
        """The config a `config.json` holds; a key it does not know (a typo, a newer
        version's) is refused by name rather than dropped."""
        if not isinstance(data, dict):
            raise ConfigError(f"{CONFIG_NAME} must hold an object, not {type(data).__name__}")
        check_keys(data, [f.name for f in dataclasses.fields(cls)], CONFIG_NAME)
        missing = [f.name for f in dataclasses.fields(cls)
                   if f.default is dataclasses.MISSING and f.name not in data]  # fmt: skip
        if missing:
            raise ConfigError(f"{CONFIG_NAME} lacks {', '.join(missing)}")
        return cls(**data)


def check_keys(data: dict, known: Iterable[str], where: str) -> None:
    """Refuse (ConfigError) the keys of `data` that are not `known`, suggesting the closest."""
    known = list(known)
    for key in data:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{where}: unknown key {key!r}{hint}; the keys are "
                              f"{', '.join(known)}")  # fmt: skip


class Parts(NamedTuple):
    """What `Pipeline(...)` is built from; `vlm.pretrained` reads them from published weights."""

    encoder: Any  # vlm.encoder.ImageEncoder
    lm: Any  # a transformers causal LM
    tokenizer: Any
    mapper: Any  # vlm.mapper.PrefixMapper or another mapper module
    config: PipelineConfig
    familiarity: Any = None  # vlm.familiarity.FamiliarityProfile, if the folder has one
    calibration: Any = None  # vlm.calibration.Calibration, if the folder has one
