"""What a training run is: its config, the model sizes and the stages."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ..factory import clip_config

STAGES = ("clip", "lm", "prefix")
CAPTION_LAYERS = 1  # CoCa decoder depth in the CLIP stage (2 layers: 11% more time a step)
# ClipCap's mapper for a frozen LM (its --only_prefix --mapping_type transformer run)
CLIPCAP_MAPPER = dict(kind="transformer", prefix_length=10, clip_length=10, num_layers=8)

# Model sizes: "small" is the bundled ShapeWorld model, "tiny" is for tests and smoke runs.
MODEL_SIZES = {
    "small": dict(
        clip=clip_config(image_size=64, patch_size=8, width=96, layers=4, embed_dim=128,
                         text_width=96, text_layers=2, context_length=24),
        # 128 positions: a 3-shot list of four 20-vector prefixes and their lines fits
        lm=dict(n_layer=3, n_embd=96, n_head=3, n_positions=128), vocab_size=400,
        # ClipCap's choice for a frozen LM: the transformer mapper; it reads the task prompt,
        # so a question about one object can be shown that object (datasets.teacher_lines)
        mapper=dict(kind="transformer", input="tokens", num_tokens=65, prefix_length=20,
                    num_layers=2, num_heads=4, reads_prompt=True),
    ),
    "tiny": dict(
        clip=clip_config(image_size=32, patch_size=8, width=32, layers=1, embed_dim=32,
                         text_width=32, text_layers=1, context_length=24),
        lm=dict(n_layer=2, n_embd=64, n_head=4, n_positions=64), vocab_size=300,
        mapper=dict(kind="mlp", prefix_length=4),
    ),
}  # fmt: skip


@dataclasses.dataclass
class TrainConfig:
    """Every knob of a training run (the CLI's flags)."""

    out: Path
    dataset: str = "shapeworld"
    size: str = "small"
    stages: tuple[str, ...] = STAGES
    seed: int = 0
    batch_size: int = 256
    clip_steps: int = 2000
    clip_lr: float = 2e-3
    clip_examples: int = 80_000
    clip_caption_weight: float = 4.0  # CoCa's captioning loss beside the contrastive one (0: off)
    lm_steps: int = 4500
    lm_lr: float = 2e-3
    lm_examples: int = 70_000  # 30% are k-shot lists (ShapeWorld.few_shot_share)
    lm_batch_size: int = 32  # blocks of the LM's n_positions tokens (small: 128)
    # the LM's positions (None: the size's): a clip's four 20-vector frames and its
    # description need 256, a narrative of three objects' frame lines, tracks, description
    # and a question 320 (docs/video-lab.md)
    lm_positions: int | None = None
    lm_answer_weight: float = 10.0  # loss weight of answer tokens (after "Answer:") vs the rest
    # LM trainings started from their own initialisations on the same text; the one with the
    # lowest loss on held-out text after lm_select_steps goes on to lm_steps (1: no selection)
    lm_candidates: int = 1
    lm_select_steps: int = 2000
    prefix_steps: int = 6000
    prefix_batch_size: int = 64  # smaller batches, more steps: lower loss for the same samples
    prefix_lr: float = 1e-3
    prefix_examples: int = 60_000
    prefix_epochs: float | None = None  # if set, replaces prefix_steps (epochs over the pairs)
    # Of the prefix stage's batches: rows of two (image, text) items, the LM reading the second
    # prefix after the first item, as in a k-shot list (None: the dataset's choice, else 0)
    prefix_context: float | None = None
    # Weight of the text teacher: on question items, the frozen LM's next-token distributions
    # after the prefix are pulled towards its own after the image's caption as text, or after
    # the line the data gives for that question (`ImagePool.teacher_lines`) where the mapper
    # reads the question (0: off; None: the dataset's choice with a frozen LM, else 0)
    prefix_text_teacher: float | None = None
    checkpoint_every: int = 250
    resume: bool = False
    bundle: Path | None = None  # where the final pipeline goes (default: <out>/pipeline)
    bundle_dtype: str = "float16"
    push_to_hub: str | None = None  # a hub repo id to upload the final pipeline to
    # real data (vlm.data): files instead of `dataset`, and pretrained parts to start from
    data: tuple[str, ...] = ()
    data_format: str = "auto"
    split: str | None = "train"
    images: Path | None = None  # image root, when paths in the data are relative to it
    limit: int | None = None  # use at most this many examples
    encoder: str | None = None  # open_clip model name or "local-dir:<folder>"
    encoder_pretrained: str | None = None  # open_clip pretrained tag or weights file
    lm: str | None = None  # a Hugging Face causal LM id or folder
    mapper: dict | None = None  # PrefixMapper options (default: MODEL_SIZES or ClipCap's)
    feature_cache: Path | None = None  # default: <out>/features for file data
    features_in_memory: bool = False  # file data: keep features in memory, not on disk
    gradient_checkpointing: bool = False
    finetune_lm: bool = False  # ablation only: train the LM with the mapper (ClipCap's variant)
    # held-out data (file data): evaluated at the end, and its loss logged while training
    val_data: tuple[str, ...] = ()  # validation files (default: a val_fraction of the data)
    val_fraction: float | None = None  # default 0.1 (Karpathy data: its own val split)
    val_every: int = 100  # steps between validation losses (0: none)
    early_stopping: int = 0  # stop after this many validations without a better loss (0: off)
    evaluate: bool = True  # score captions / answers on the held-out part at the end
    max_new_tokens: int = 60  # for that evaluation
    strict: bool = False  # stop at a bad row (a missing or unreadable image) instead of skipping


# ---------------------------------------------------------------------------- progress
