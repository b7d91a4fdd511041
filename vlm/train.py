"""The trainer: the method of the project in three stages, on any dataset.

1. `clip`   — a CLIP-style encoder trained contrastively on image-caption pairs (open_clip);
2. `lm`     — a GPT-2-architecture LM trained on text, with its own BPE tokenizer;
3. `prefix` — the mapper trained to make the *frozen* LM read its prefix as the image: encoder
              and LM get no gradient (checked at every step).

`accelerate` runs the same code on a CPU, a GPU or several; each stage shows progress, logs its
loss to `<out>/log.jsonl`, checkpoints every `--checkpoint-every` steps and resumes from there.
The result is a `save_pretrained` folder (`--bundle`) that `Pipeline.from_pretrained` loads.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.nn.utils.rnn import pad_sequence
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from .calibration import calibration_from_data
from .caption_head import CaptionHead, caption_vocabulary
from .data import DataError, FileDataset
from .datasets import DATASETS
from .device import default_device, half_dtype, training_precision
from .encoder import Encoder
from .errors import ConfigError, InputError
from .factory import build_encoder, build_lm, build_pipeline, clip_config, train_tokenizer
from .familiarity import profile_from_data
from .features import FeatureCache, features_in_memory
from .pipeline import PipelineConfig
from .prompts import answer_cue
from .sequences import prefix_loss, prefixed, scored_ends
from .text_batches import answer_mask, pack_texts, split_prompt

STAGES = ("clip", "lm", "prefix")
CAPTION_LAYERS = 1  # CoCa decoder depth in the CLIP stage (2 layers: 11% more time a step)
# ClipCap's mapper for a frozen LM (its --only_prefix --mapping_type transformer run)
CLIPCAP_MAPPER = dict(kind="transformer", prefix_length=10, clip_length=10, num_layers=8)

# Model sizes: "small" is the bundled ShapeWorld model, "tiny" is for tests and smoke runs.
SIZES = {
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
    mapper: dict | None = None  # PrefixMapper options (default: SIZES or ClipCap's)
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


@dataclasses.dataclass(frozen=True)
class TrainEvent:
    """What a training run reports as it goes (`Progress.on_event`), in this order: "stage"
    (a stage starts: its `steps`), then "step" (every 10 steps: `loss`), "validation"
    (`val_loss`), "samples" (held-out images captioned by the prefix stage's current mapper:
    `samples`, reference -> caption) and "checkpoint" (`path`) as they come; at the end "done"
    (`path`: the saved model folder) or "stopped" (stopped when asked; the stage's checkpoint
    saved, from which `resume` goes on)."""

    kind: str
    stage: str = ""
    step: int = 0  # steps done in this stage
    steps: int = 0  # the stage's steps
    loss: float | None = None
    val_loss: float | None = None
    samples: dict[str, str] | None = None
    path: str | None = None
    scores: dict | None = None  # "done": the held-out evaluation's (file data)
    seconds: float = 0.0  # since the run started


class TrainingStopped(Exception):
    """Raised inside a run when its `Progress.stop` is set; `train` returns None."""


@dataclasses.dataclass
class Progress:
    """Where a run reports (`on_event`, called in the training thread) and how it is told to
    stop (`stop`, checked before every step). `sample_every`: the prefix stage captions a few
    held-out images this often (0: never). The CLI shows tqdm bars; the page follows a job."""

    on_event: Callable[[TrainEvent], None] | None = None
    stop: threading.Event | None = None
    sample_every: int = 0
    samples: Callable[[], dict[str, str]] | None = None  # set by the prefix stage
    started: float = dataclasses.field(default_factory=time.time)

    def emit(self, kind: str, **fields) -> None:
        if self.on_event is not None:
            self.on_event(TrainEvent(kind, seconds=time.time() - self.started, **fields))

    @property
    def stopped(self) -> bool:
        return self.stop is not None and self.stop.is_set()


# ---------------------------------------------------------------------------- the stage loop


def _schedule(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10%."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def run_stage(
    name: str,
    module: torch.nn.Module,
    loss_fn: Callable[[torch.nn.Module, object], torch.Tensor],
    batches: Callable[[int], Iterator],
    steps: int,
    lr: float,
    config: TrainConfig,
    accelerator: Accelerator,
    check: Callable[[], None] | None = None,
    batch_size: int = 0,
    validate: Callable[[torch.nn.Module], float] | None = None,
    until: int | None = None,
    resume: bool | None = None,
    progress: Progress | None = None,
) -> torch.nn.Module:
    """Train `module` for `steps` steps of `loss_fn` on `batches(start_step)`, with AdamW, a
    cosine schedule, checkpoints and resume. `check` runs after each backward pass;
    `batch_size` (all processes together) is for the log's samples and samples/s.
    `validate(module)` gives the held-out loss, logged every `config.val_every` steps; with
    `config.early_stopping` the stage stops when it has not improved that many times in a row
    and keeps the weights of its best validation. `until`: stop after that many of the `steps`
    (a checkpoint there, the schedule still the whole stage's); `resume` overrides
    `config.resume`. `progress` hears of every step, validation, sample and checkpoint, and
    may stop the stage (a checkpoint, then `TrainingStopped`)."""
    progress = progress or Progress()
    checkpoint = config.out / "checkpoints" / name
    accelerator.free_memory()  # a checkpoint holds this stage's module alone, not earlier ones
    end = steps if until is None else min(until, steps)
    resume = config.resume if resume is None else resume
    params = [p for p in module.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr, betas=(0.9, 0.98),
    )  # fmt: skip
    warmup = max(1, min(100, steps // 10))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _schedule(s, steps, warmup))
    module, optimizer, scheduler = accelerator.prepare(module, optimizer, scheduler)
    start = 0
    log = config.out / "log.jsonl"
    if resume and (checkpoint / "step.json").is_file():
        accelerator.load_state(str(checkpoint))
        start = json.loads((checkpoint / "step.json").read_text())["step"]
        accelerator.print(f"[{name}] resuming at step {start}")
        if accelerator.is_main_process:
            _forget_steps(log, name, start)  # the killed run logged them after its checkpoint
    module.train()
    stream = batches(start)
    bar = tqdm(range(start, end), desc=name, disable=not accelerator.is_main_process,
               mininterval=2, initial=start, total=steps)  # fmt: skip
    tic = time.time()
    best, best_state, worse, value = math.inf, None, 0, math.nan
    progress.emit("stage", stage=name, step=start, steps=steps)
    for step in bar:
        if progress.stopped:
            _save_checkpoint(accelerator, checkpoint, step, progress, name, steps)
            bar.close()
            progress.emit("stopped", stage=name, step=step, steps=steps, path=str(checkpoint))
            raise TrainingStopped(f"{name} stopped at step {step}")
        loss = loss_fn(module, next(stream))
        accelerator.backward(loss)
        if check is not None:
            check()
        accelerator.clip_grad_norm_(module.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 10 == 0 or step == steps - 1:
            value = accelerator.gather(loss.detach()[None]).mean().item()
            bar.set_postfix(loss=f"{value:.4f}")
            progress.emit("step", stage=name, step=step + 1, steps=steps, loss=value)
            if accelerator.is_main_process:
                seconds = time.time() - tic
                record = dict(stage=name, step=step, loss=value, lr=scheduler.get_last_lr()[0],
                              seconds=seconds, processes=accelerator.num_processes)  # fmt: skip
                if batch_size:
                    record["samples"] = (step + 1) * batch_size
                    record["samples_per_s"] = (step + 1 - start) * batch_size / seconds
                with log.open("a") as handle:
                    handle.write(json.dumps(record) + "\n")
        stop = False
        if (
            validate
            and config.val_every
            and ((step + 1) % config.val_every == 0 or step + 1 == steps)
        ):
            module.eval()
            val_loss = validate(accelerator.unwrap_model(module))
            module.train()
            bar.set_postfix(loss=f"{value:.4f}", val_loss=f"{val_loss:.4f}")
            progress.emit("validation", stage=name, step=step + 1, steps=steps, val_loss=val_loss)
            if accelerator.is_main_process:
                with log.open("a") as handle:
                    handle.write(json.dumps(dict(stage=name, step=step, val_loss=val_loss)) + "\n")
            if val_loss < best:
                best, worse = val_loss, 0
                if config.early_stopping:
                    state = accelerator.unwrap_model(module).state_dict()
                    best_state = {k: v.detach().clone() for k, v in state.items()}
            else:
                worse += 1
                stop = bool(config.early_stopping) and worse >= config.early_stopping
        if progress.samples and progress.sample_every and (step + 1) % progress.sample_every == 0:
            module.eval()
            progress.emit("samples", stage=name, step=step + 1, steps=steps,
                          samples=progress.samples())  # fmt: skip
            module.train()
        if stop or (step + 1) % config.checkpoint_every == 0 or step + 1 in (steps, end):
            _save_checkpoint(accelerator, checkpoint, step + 1, progress, name, steps)
        if stop:
            accelerator.print(f"[{name}] early stop at step {step + 1}: the validation loss has "
                              f"not improved on {best:.4f} for {worse} validations")  # fmt: skip
            break
    bar.close()
    module.eval()
    module = accelerator.unwrap_model(module)
    if best_state is not None:  # the weights of the best validation, not the last ones
        module.load_state_dict(best_state)
    return module


def _save_checkpoint(accelerator, checkpoint: Path, done: int, progress, name, steps) -> None:
    """The stage's state after `done` steps, from which `resume` goes on."""
    accelerator.save_state(str(checkpoint))
    if accelerator.is_main_process:
        (checkpoint / "step.json").write_text(json.dumps({"step": done}))
    progress.emit("checkpoint", stage=name, step=done, steps=steps, path=str(checkpoint))


def _forget_steps(log: Path, stage: str, start: int) -> None:
    """Drop the log rows of `stage` from step `start` on: a resumed run logs them again."""
    if not log.is_file():
        return
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    kept = [r for r in rows if not (r.get("stage") == stage and r.get("step", -1) >= start)]
    if len(kept) < len(rows):
        log.write_text("".join(json.dumps(r) + "\n" for r in kept))


def _epochs(
    n: int, batch_size: int, seed: str, accelerator: Accelerator, pairs: bool = False
) -> Iterator[list[int]]:
    """Endless shuffled batches of indices, the same in every process, each process taking
    its share of every batch (data parallel); with `pairs`, items 2i and 2i+1 stay together."""
    rng = random.Random(seed)
    unit = 2 if pairs else 1
    rank, world = accelerator.process_index, accelerator.num_processes
    if n // unit < world:
        raise InputError(f"{n} examples are too few for {world} processes")
    while True:
        order = list(range(n // unit))
        rng.shuffle(order)
        per_batch = min(len(order), max(world, batch_size // unit))  # no bigger than the data
        for i in range(0, len(order) - per_batch + 1, per_batch):
            mine = order[i : i + per_batch][rank::world]
            yield [j * unit + k for j in mine for k in range(unit)]


# ---------------------------------------------------------------------------- the stages


def train_clip(dataset, config: TrainConfig, accelerator: Accelerator, progress=None) -> Encoder:
    """Stage 1: contrastive image-text training of a small open_clip CLIP, with CoCa's
    captioning loss beside it when `clip_caption_weight` > 0 (its decoder is dropped after)."""
    encoder = build_encoder(SIZES[config.size]["clip"])
    data = dataset.clip_data(config.clip_examples, config.seed)
    loss = open_clip.ClipLoss(
        world_size=accelerator.num_processes, rank=accelerator.process_index,
        local_loss=False, gather_with_grad=True,
    )  # fmt: skip
    model = torch.nn.ModuleDict({"clip": encoder.model.requires_grad_(True)})
    captioning = config.clip_caption_weight > 0
    if captioning:
        captions = sorted({texts[0] for texts in data.texts})  # the first: ShapeWorld's canonical
        vocabulary = caption_vocabulary(encoder.tokenizer, captions)
        width = encoder.model.visual.transformer.width
        context = encoder.tokenizer.context_length
        model["caption"] = CaptionHead(vocabulary, width, CAPTION_LAYERS, context)

    def batches(start: int):
        rng = random.Random(f"clip-texts-{config.seed}-{start}")
        indices = _epochs(len(data), config.batch_size, f"clip-{config.seed}-{start}",
                          accelerator, pairs=True)  # fmt: skip
        for batch in indices:
            items = [data[i] for i in batch]
            pixels = encoder.pixels([image for image, _ in items])
            tokens = encoder.tokenizer([rng.choice(texts) for _, texts in items])
            captions = encoder.tokenizer([texts[0] for _, texts in items]) if captioning else None
            yield pixels.to(accelerator.device), tokens.to(accelerator.device), captions

    def loss_fn(module, batch):
        pixels, tokens, captions = batch
        clip = module["clip"]  # encoder.model: the tokens come through the encoder's lock
        pooled, patches = encoder.pooled_and_patches(pixels, mixed=False, project=False)
        image = F.normalize(pooled, dim=-1)
        text = clip.encode_text(tokens, normalize=True)
        total = loss(image, text, clip.logit_scale.exp())
        if captioning:
            # half the batch, one scene of each twin pair: half the decoder's cost
            half = captions[::2].to(accelerator.device)
            caption_loss = module["caption"](patches[::2], half)
            total = total + config.clip_caption_weight * caption_loss
        return total

    model = run_stage("clip", model, loss_fn, batches, config.clip_steps, config.clip_lr,
                      config, accelerator, batch_size=config.batch_size,
                      progress=progress)  # fmt: skip
    encoder.model = model["clip"].requires_grad_(False)
    return encoder


def train_lm(dataset, config: TrainConfig, accelerator: Accelerator, progress=None):
    """Stage 2: a byte-level BPE tokenizer and a small GPT-2 trained on the dataset's text.

    Answer tokens weigh `lm_answer_weight` times the rest in the loss: they are the few
    tokens that only reading the context predicts (a caption is as random as its scene). At
    weight 1 the LM never learned to look an answer up: with the caption on the line before,
    "is there a green circle?" was answered at chance (0.51); at 10, 0.95
    (experiments/text_answers.py)."""
    texts = dataset.texts(config.lm_examples, config.seed)
    tokenizer = train_tokenizer(texts[:20000], SIZES[config.size]["vocab_size"])
    lm = build_lm(tokenizer, **SIZES[config.size]["lm"])
    block_size = lm.config.n_positions  # the LM reads text at every position it has
    blocks = pack_texts(tokenizer, texts, block_size)
    template = dataset.pipeline_config().get("question_template", PipelineConfig.question_template)
    cue = answer_cue(template)
    more = dataset.answer_cues() if hasattr(dataset, "answer_cues") else ()
    marks = answer_mask(tokenizer, blocks, cue, more)
    weights = 1 + (config.lm_answer_weight - 1) * marks.float()

    def batches(start: int):
        seed = f"lm-{config.seed}-{start}"
        for batch in _epochs(len(blocks), config.lm_batch_size, seed, accelerator):
            yield blocks[batch].to(accelerator.device), weights[batch].to(accelerator.device)

    def loss_fn(module, batch):
        tokens, weight = batch
        logits = module(input_ids=tokens).logits[:, :-1]
        loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten(), reduction="none")
        return (loss * weight[:, 1:].flatten()).sum() / weight[:, 1:].sum()

    def held_out_loss(texts: list[str]) -> Callable[[torch.nn.Module], float] | None:
        """The held-out texts' loss, weighted as in training (None: no text)."""
        blocks = pack_texts(tokenizer, texts, block_size) if texts else None
        if blocks is None or not len(blocks):
            return None
        weights = 1 + (config.lm_answer_weight - 1) * answer_mask(tokenizer, blocks, cue, more)

        @torch.no_grad()
        def loss(module):
            chunks = range(0, len(blocks), config.lm_batch_size)
            losses = [loss_fn(module, (blocks[i : i + config.lm_batch_size].to(
                accelerator.device), weights[i : i + config.lm_batch_size].to(
                accelerator.device))).item() for i in chunks]  # fmt: skip
            return float(sum(losses) / len(losses))

        return loss

    # logged every val_every steps: file data's validation part
    validate = held_out_loss(dataset.val_texts()) if hasattr(dataset, "val_texts") else None

    def stage(name: str, module, **kwargs):
        return run_stage(name, module, loss_fn, batches, config.lm_steps, config.lm_lr, config,
                         accelerator, batch_size=config.lm_batch_size, validate=validate,
                         progress=progress, **kwargs)  # fmt: skip

    if config.lm_candidates <= 1:
        return stage("lm", lm), tokenizer
    score = validate  # the choice: that part, else the dataset's own held-out documents
    if score is None and hasattr(dataset, "selection_texts"):
        score = held_out_loss(dataset.selection_texts())
    if score is None:
        raise ConfigError("--lm-candidates needs held-out text to choose by: give validation "
                         "data (--val-data or --val-fraction)")  # fmt: skip

    def candidate(k: int):  # the first is the LM a run without selection starts from
        torch.manual_seed(config.seed * 1000 + k)
        return build_lm(tokenizer, **SIZES[config.size]["lm"])

    losses = []
    for k in range(config.lm_candidates):
        module = stage(f"lm-{k}", lm if k == 0 else candidate(k), until=config.lm_select_steps)
        losses.append(score(module))
    best = min(range(len(losses)), key=losses.__getitem__)
    accelerator.print(
        f"[lm] held-out text loss of each candidate after "
        f"{config.lm_select_steps} steps: "
        + ", ".join(f"{v:.4f}" for v in losses)
        + f"; going on with {best}"
    )
    if accelerator.is_main_process:
        with (config.out / "log.jsonl").open("a") as handle:
            handle.write(
                json.dumps(dict(stage="lm-selection", candidates=losses, chosen=best)) + "\n"
            )
    return stage(f"lm-{best}", candidate(best), resume=True), tokenizer


def text_teacher_loss(
    lm, logits: torch.Tensor, prefix_length: int, teacher: tuple[torch.Tensor, ...]
):
    """KL(teacher || student), per taught token, of the LM's next-token distributions over
    each row's text: the student is the LM after the visual prefix (`logits` of the prefix and
    the text, [B, prefix_length + n, V]), the teacher the same frozen LM reading the image's
    caption line before the same text.
    `teacher`: (token ids [B, m], where each row's text starts in them [B], mask [B, n])."""
    tokens, starts, mask = teacher
    taught = mask.any(1)  # the teacher reads only the rows it teaches (not captions)
    if not taught.any():
        return logits.new_zeros(())
    tokens, starts, mask = tokens[taught], starts[taught], mask[taught]
    student = logits[taught, prefix_length - 1 : prefix_length - 1 + mask.shape[1]]
    with torch.no_grad():
        read = lm(input_ids=tokens, use_cache=False).logits
        steps = torch.arange(mask.shape[1], device=tokens.device)
        where = (starts[:, None] - 1 + steps).clamp(max=tokens.shape[1] - 1)
        target = read.gather(1, where[..., None].expand(-1, -1, read.shape[-1]))
    kl = F.kl_div(student.float().log_softmax(-1), target.float().log_softmax(-1),
                  log_target=True, reduction="none").sum(-1)  # fmt: skip
    return (kl * mask).sum() / mask.sum().clamp(min=1)


def prefix_features(dataset, pipeline, config: TrainConfig, accelerator, held_out: bool = False):
    """(texts of each item, lookup(indices) -> features, the text teacher's lines of each item
    or None) for the prefix stage: rendered datasets (whose pools may give teacher lines) are
    encoded in memory; file datasets stream through a `FeatureCache`, their bad
    rows (missing or unreadable images) skipped, counted and listed, or fatal with `strict`.
    `held_out`: the same for the validation examples."""
    if not hasattr(dataset, "examples"):
        data = dataset.prefix_data(config.prefix_examples, config.seed)
        features = features_in_memory(pipeline, data)
        return data.texts, lambda indices: features[indices], data.teacher_lines
    cache = FeatureCache(None if config.features_in_memory else config.feature_cache, pipeline)
    shared = cache.dir is not None  # on disk, each process encodes its share
    rank, world = (accelerator.process_index, accelerator.num_processes) if shared else (0, 1)
    examples = dataset.val_examples() if held_out else dataset.examples()
    records, failed = cache.add(examples, rank=rank, world=world)
    bad = dataset.val_bad if held_out else dataset.bad
    for where, reason in failed:
        bad.skip(where, f"unreadable image: {reason}")
    accelerator.wait_for_everyone()
    cache.refresh()
    records = [(key, texts) for key, texts in records if key in cache and texts]
    what = "validation examples" if held_out else "examples"
    if bad:
        accelerator.print(bad.report(len(records) + len(bad)))
    if not records:
        if held_out:
            return [], None, None
        raise DataError("no readable image with a caption or question in the data")
    accelerator.print(
        f"{len(records)} {what}, {cache.encoded} images encoded now, {len(bad)} skipped"
        + (f"; features cached in {cache.dir}" if shared else "")
    )
    keys = [key for key, _ in records]
    texts = [texts for _, texts in records]
    return texts, lambda indices: cache.get([keys[i] for i in indices]), None


def train_prefix(
    dataset, encoder: Encoder, lm, tokenizer, config: TrainConfig, accelerator, progress=None
):
    """Stage 3: the mapper, trained through the frozen LM from frozen-encoder features; with
    `progress.sample_every`, a few held-out images captioned as it learns."""
    mapper_options = config.mapper or (
        CLIPCAP_MAPPER if config.lm else SIZES[config.size]["mapper"]
    )
    if mapper_options.get("input") == "tokens" and not mapper_options.get("num_tokens"):
        mapper_options = {**mapper_options, "num_tokens": full_grid_tokens(encoder)}
    pipeline = build_pipeline(
        encoder, lm, tokenizer, mapper_options,
        device=accelerator.device, **dataset.pipeline_config(),
    )  # fmt: skip
    frozen = [*pipeline.encoder.model.parameters(), *pipeline.lm.parameters()]
    assert not any(p.requires_grad for p in frozen), "encoder and LM must be frozen"
    if config.finetune_lm:  # the ablation: ClipCap's other variant, the LM learns too
        frozen = list(pipeline.encoder.model.parameters())
        pipeline.lm.float().requires_grad_(True)
    if config.gradient_checkpointing:
        _checkpoint_layers(pipeline.lm)
    texts, lookup, lines = prefix_features(dataset, pipeline, config, accelerator)
    # a mapper that does not read the question cannot show each question its own object
    teacher_lines = lines if pipeline.mapper.reads_prompt else None
    batch_size = min(config.prefix_batch_size, len(texts))
    steps = config.prefix_steps
    if config.prefix_epochs is not None:  # an epoch: every (image, text) pair once, as ClipCap
        pairs = sum(len(t) for t in texts)
        steps = max(1, math.ceil(config.prefix_epochs * pairs / batch_size))

    context_share = config.prefix_context
    if context_share is None:
        context_share = getattr(dataset, "prefix_context", 0.0)
    prefix_length = pipeline.mapper.prefix_length

    def mapper_inputs(features: torch.Tensor, prompts: list[str]) -> tuple:
        """What the mapper reads: the features, and the task prompts' LM states if it reads
        them (the frozen LM's, computed without autograd)."""
        features = features.float().to(accelerator.device)
        if not pipeline.mapper.reads_prompt:
            return (features,)
        return features, *pipeline.prompt_states(prompts)

    def items(indices: list[int], rng, context: bool = False, taught: bool = True):
        """(mapper inputs, tokens, labels) of items; a context item's text ends its line.
        With the text teacher (`taught`, rows of one only), also the teacher's input."""
        pairs = [split_prompt(rng.choice(texts[i]), pipeline.config) for i in indices]
        prompts, targets = [p for p, _ in pairs], [t + "\n" * context for _, t in pairs]
        tokens = pipeline.sequences.training_rows(targets, prompts, eos=not context,
                                                  device=accelerator.device)  # fmt: skip
        item = (mapper_inputs(lookup(indices), prompts), *tokens)
        if config.prefix_text_teacher and taught and not context:
            item += (teacher_rows(indices, prompts, *tokens),)
        return item

    def teacher_rows(indices: list[int], prompts: list[str], tokens, labels):
        """The text teacher's input for each item: the line the data gives for its question
        (`teacher_lines`) or the image's caption line, as text, then the item's own tokens.
        Only questions are taught: a caption has no caption to read first."""
        caption_prompt = pipeline.config.caption_prompt
        rows, starts = [], []
        mask = torch.zeros(tokens.shape)
        on_cpu = tokens.cpu()  # one copy from the device, not one per row
        lengths = scored_ends(labels.cpu())
        for row, (i, prompt, length) in enumerate(zip(indices, prompts, lengths, strict=True)):
            captions = [t for t in texts[i] if t.startswith(caption_prompt)]
            first = []
            if captions and prompt and prompt != caption_prompt:  # a question
                line = teacher_lines[i].get(prompt, captions[0]) if teacher_lines else captions[0]
                first = tokenizer(line + "\n", add_special_tokens=False)["input_ids"]
            if len(first) + length > pipeline.max_positions:
                first = []  # the two would not fit in the LM's positions: not taught
            mask[row, :length] = bool(first)
            rows.append(torch.tensor(first + on_cpu[row, :length].tolist()))
            starts.append(max(len(first), 1))  # a row without a teacher is masked out
        ids = pad_sequence(rows, batch_first=True, padding_value=tokenizer.eos_token_id)
        device = tokens.device
        return ids.to(device), torch.tensor(starts, device=device), mask.to(device)

    def batches(start: int):
        rng = random.Random(f"prefix-texts-{config.seed}-{start}")
        seed = f"prefix-{config.seed}-{start}"
        for batch in _epochs(len(texts), batch_size, seed, accelerator):
            half = len(batch) // 2 if rng.random() < context_share else 0
            if half:  # rows of two items: the first half is read before the second
                main = items(batch[half : 2 * half], rng, taught=False)
                context = items(batch[:half], rng, context=True)
                length = 2 * prefix_length + main[1].shape[1] + context[1].shape[1]
                if length <= pipeline.max_positions:
                    yield main, context
                    continue
            yield items(batch, rng), None  # (or the two would not fit in the LM's positions)

    def parts(module):  # (lm, mapper) of the trained module: the mapper, or both (ablation)
        return (module["lm"], module["mapper"]) if config.finetune_lm else (pipeline.lm, module)

    def loss_fn(module, batch):
        (inputs, tokens, labels, *teacher), context = batch
        lm, mapper = parts(module)
        if context is not None:
            context = (mapper(*context[0]), *context[1:])
        if not teacher or context is not None:
            return prefix_loss(lm, mapper(*inputs), tokens, labels, context)
        embeds, targets = prefixed(lm, mapper(*inputs), tokens, labels)
        out = lm(inputs_embeds=embeds, labels=targets, use_cache=False)
        taught = text_teacher_loss(lm, out.logits, prefix_length, *teacher)
        return out.loss + config.prefix_text_teacher * taught

    def check():  # the method's promise: nothing but the mapper learns (the LM too: ablation)
        assert all(p.grad is None for p in frozen), "a gradient reached a frozen part"

    validate = None
    if config.val_every and hasattr(dataset, "val_examples"):
        val_texts, val_lookup, _ = prefix_features(dataset, pipeline, config, accelerator, True)
        val_pairs = [(i, split_prompt(t, pipeline.config)) for i, ts in enumerate(val_texts)
                     for t in ts]  # fmt: skip

        @torch.no_grad()
        def validate(module):  # every held-out (image, text) pair once
            lm, mapper = parts(module)
            losses = []
            for start in range(0, len(val_pairs), batch_size):
                chunk = val_pairs[start : start + batch_size]
                prompts, targets = [p for _, (p, _) in chunk], [t for _, (_, t) in chunk]
                inputs = mapper_inputs(val_lookup([i for i, _ in chunk]), prompts)
                tokens, labels = pipeline.sequences.training_rows(
                    targets, prompts, device=accelerator.device
                )
                loss = prefix_loss(lm, mapper(*inputs), tokens, labels)
                losses.append(loss.item())
            return float(sum(losses) / len(losses))

        validate = validate if val_pairs else None

    module = pipeline.mapper.requires_grad_(True)
    if config.finetune_lm:
        module = torch.nn.ModuleDict({"mapper": module, "lm": pipeline.lm})
    if progress is not None and progress.sample_every:
        progress = dataclasses.replace(progress, samples=_sampler(dataset, pipeline, config))
    module = run_stage("prefix", module, loss_fn, batches, steps, config.prefix_lr,
                       config, accelerator, check, batch_size, validate,
                       progress=progress)  # fmt: skip
    pipeline.lm, pipeline.mapper = parts(module)
    pipeline.lm.requires_grad_(False)
    return pipeline


SAMPLES = 4  # held-out images the prefix stage captions as it learns (Progress.sample_every)


def _sampler(dataset, pipeline, config: TrainConfig) -> Callable[[], dict[str, str]] | None:
    """What captions a few held-out images (the dataset's calibration examples: never trained
    on) with the pipeline as it is: {reference caption: caption}."""
    examples = dataset.calibration_examples(SAMPLES, config.seed)[:SAMPLES]
    if not examples or "caption" not in pipeline.tasks:
        return None
    images = [e.image for e in examples]
    names = [e.captions[0] if e.captions else f"image {i + 1}" for i, e in enumerate(examples)]

    def samples() -> dict[str, str]:
        return dict(zip(names, pipeline.caption(images), strict=True))

    return samples


def full_grid_tokens(encoder: Encoder) -> int:
    """`num_tokens` of a mapper reading the encoder's image tokens: its pooled embedding and
    its full grid of patch tokens (the bundled model's choice: 1 + 8 × 8)."""
    grid = getattr(encoder.model.visual, "grid_size", None)
    if not grid:
        raise ConfigError("--mapper-input tokens needs a ViT image encoder (it reads patch tokens)")
    return 1 + grid[0] * grid[1]


def _checkpoint_layers(lm) -> None:
    """Gradient checkpointing in the frozen LM's layers (activations recomputed in the
    backward pass: less memory for big LMs), while the LM stays in eval mode (no dropout):
    transformers checkpoints a layer only when that layer says it is training."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    options = {"use_reentrant": False}
    if hasattr(lm, "activation_checkpointing_enable"):  # the newer name (transformers ≥ 5.3x)
        lm.activation_checkpointing_enable(activation_checkpointing_kwargs=options)
    else:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)
    for module in lm.modules():
        if isinstance(module, GradientCheckpointingLayer):
            module.training = True


# ---------------------------------------------------------------------------- the whole run


def _dataset(config: TrainConfig):
    if config.data:
        return FileDataset(config.data, config.data_format, config.split, config.images,
                           config.limit, val_data=config.val_data,
                           val_fraction=config.val_fraction, strict=config.strict)  # fmt: skip
    if config.dataset not in DATASETS:
        raise DataError(f"no dataset named {config.dataset!r} and no such file or folder; "
                        f"give a data file or folder, or one of {', '.join(DATASETS)}")  # fmt: skip
    return DATASETS[config.dataset]()


def check_parts(config: TrainConfig) -> None:
    """Fail early, in one line, on an `encoder` or `lm` that can't load (before any data is
    read): a folder given as an encoder name, a missing folder, an unknown model name."""
    if config.encoder:
        name = config.encoder
        if name.startswith("local-dir:"):
            folder = Path(name.removeprefix("local-dir:"))
            if not (folder / "open_clip_config.json").is_file():
                raise ConfigError(f"--encoder {name}: {folder} is not an open_clip folder "
                                 "(no open_clip_config.json in it)")  # fmt: skip
        elif Path(name).exists():
            raise ConfigError(f"--encoder {name} is a folder: write --encoder local-dir:{name} "
                             "to load an open_clip folder")  # fmt: skip
        elif not name.startswith("hf-hub:") and name not in open_clip.list_models():
            raise ConfigError(
                f"--encoder {name}: not an open_clip model name (e.g. ViT-B-32-quickgelu; "
                "open_clip.list_models() has them all) nor local-dir:<folder>"
            )
    if config.lm:
        lm = Path(config.lm).expanduser()
        if lm.is_dir() and not (lm / "config.json").is_file():
            raise ConfigError(f"--lm {config.lm}: not a Hugging Face model folder (no config.json)")
        path_like = config.lm.startswith((".", "/", "~")) or config.lm.count("/") > 1
        if not lm.exists() and path_like:
            raise ConfigError(f"--lm {config.lm}: no such folder")


def _load_lm(source: str | Path, dtype):
    """The frozen LM and its tokenizer from a folder or a hub id, with a one-line error."""
    try:
        lm = AutoModelForCausalLM.from_pretrained(source, dtype=dtype).requires_grad_(False)
        tokenizer = AutoTokenizer.from_pretrained(source)
    except OSError as error:
        if Path(source).exists():
            raise ConfigError(f"--lm {source}: can't load it: {error}") from None
        raise ConfigError(
            f"--lm {source}: no such folder, and as a Hugging Face hub id it is not in the "
            "local cache (hub ids need the network the first time; offline, give the folder "
            "of a saved causal LM)"
        ) from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return lm, tokenizer


def _frozen_parts(config: TrainConfig, encoder_dir: Path, lm_dir: Path, device):
    """The encoder and LM the prefix stage starts from: pretrained ones named in the config,
    else the ones the earlier stages saved in the run folder. On a GPU the frozen LM runs in
    bf16 (fp16 if bf16 is not supported)."""
    if config.encoder:
        spec = {"model": config.encoder}
        if config.encoder_pretrained:
            spec["pretrained"] = config.encoder_pretrained
        encoder = Encoder.load(spec)
    else:
        encoder = Encoder.load({"model": f"local-dir:{encoder_dir.resolve()}"})
    lm, tokenizer = _load_lm(config.lm or lm_dir, half_dtype(device) or torch.float32)
    return encoder, lm, tokenizer


def train(config: TrainConfig, progress: Progress | None = None):
    """Run the requested stages; finished stages are loaded from `<out>` instead of rerun.
    Returns the trained pipeline (saved to `config.bundle` or `<out>/pipeline`), or None
    when `progress.stop` stopped it (its stage's checkpoint saved: `resume` goes on).

    With pretrained parts (`encoder`, `lm`), only the prefix stage runs. `progress` hears of
    each stage, step, validation, sample and checkpoint (`TrainEvent`), then "done"."""
    progress = progress or Progress()
    try:
        return _train(config, progress)
    except TrainingStopped:
        return None


def _train(config: TrainConfig, progress: Progress):
    on_cpu = default_device().type == "cpu"  # then several processes are CPU ones (gloo)
    accelerator = Accelerator(cpu=on_cpu, mixed_precision=training_precision(default_device()))
    set_seed(config.seed)
    check_parts(config)
    config.out.mkdir(parents=True, exist_ok=True)
    if config.data and config.feature_cache is None and not config.features_in_memory:
        config = dataclasses.replace(config, feature_cache=config.out / "features")
    dataset = _dataset(config)
    if config.prefix_text_teacher is None:  # the dataset's recipe, for a frozen LM only
        default = 0.0 if config.finetune_lm else getattr(dataset, "prefix_text_teacher", 0.0)
        config = dataclasses.replace(config, prefix_text_teacher=default)
    if config.prefix_text_teacher and (
        config.finetune_lm or not dataset.pipeline_config().get("caption_prompt")
    ):
        raise ConfigError(  # before any stage runs
            "--prefix-text-teacher needs a frozen LM (not --finetune-lm) and captions marked by "
            "a caption prompt, as ShapeWorld's are ('Caption: ...'), to read before a question"
        )
    encoder_dir, lm_dir = config.out / "encoder", config.out / "lm"
    stages = [s for s in config.stages if not (s == "clip" and config.encoder)]
    stages = [s for s in stages if not (s == "lm" and config.lm)]
    tic = time.time()

    if "clip" in stages and not (config.resume and (encoder_dir / "done").exists()):
        encoder = train_clip(dataset, config, accelerator, progress)
        if accelerator.is_main_process:
            encoder.save(encoder_dir)
            (encoder_dir / "done").touch()
    accelerator.wait_for_everyone()

    if "lm" in stages and not (config.resume and (lm_dir / "done").exists()):
        lm, tokenizer = train_lm(dataset, config, accelerator, progress)
        if accelerator.is_main_process:
            lm.save_pretrained(lm_dir)
            tokenizer.save_pretrained(lm_dir)
            (lm_dir / "done").touch()
    accelerator.wait_for_everyone()
    if "prefix" not in stages:
        return None
    encoder, lm, tokenizer = _frozen_parts(config, encoder_dir, lm_dir, accelerator.device)
    pipeline = train_prefix(dataset, encoder, lm, tokenizer, config, accelerator, progress)
    if accelerator.is_main_process:
        # what its training images look like, so it can say when an image is unlike them
        pipeline.familiarity_profile = profile_from_data(
            pipeline.encoder, dataset, seed=config.seed
        )
        # and how often what it says is right, from held-out examples
        pipeline.calibration = calibration_from_data(pipeline, dataset, seed=config.seed)
        bundle = config.bundle or config.out / "pipeline"
        pipeline.save_pretrained(bundle, dtype=getattr(torch, config.bundle_dtype))
        accelerator.print(f"saved {bundle} after {time.time() - tic:.0f} s")
        scores = None
        if config.evaluate and hasattr(dataset, "val_examples"):
            scores = (evaluate_held_out(pipeline, dataset, config) or {}).get("scores")
        if config.push_to_hub:
            url = pipeline.push_to_hub(config.push_to_hub, folder=bundle)
            accelerator.print(f"pushed to {url}")
        progress.emit("done", path=str(bundle), scores=scores)
    accelerator.wait_for_everyone()
    return pipeline


def evaluate_held_out(pipeline, dataset, config: TrainConfig) -> dict | None:
    """Caption metrics (and VQA accuracy for Q/A data) on the held-out examples, printed as
    a table and logged to log.jsonl (`{"stage": "eval", "scores": …}`)."""
    from . import evaluate

    examples = list(dataset.val_examples())
    if not examples:
        print("no held-out examples to evaluate on (--val-fraction 0 and no --val-data)")
        return None
    kwargs = dict(max_new_tokens=config.max_new_tokens, strict=config.strict)
    results = {"scores": {}, "notes": [], "skipped": []}
    if any(e.captions for e in examples):
        part = evaluate.evaluate_captions(pipeline, examples, **kwargs)
        results["scores"].update(part["scores"])
        results["notes"] += part["notes"]
        results["skipped"] += part["skipped"]
        results["images"] = part["images"]
    if any(e.question is not None for e in examples):
        part = evaluate.evaluate_vqa(pipeline, examples, strict=config.strict)
        results["scores"]["VQA accuracy"] = part["scores"]["accuracy"]
        results["notes"] += part["notes"]
        results["skipped"] += part["skipped"]
        results["questions"] = part["questions"]
    results["notes"] = list(dict.fromkeys(results["notes"]))
    counts = ", ".join(f"{results[k]} {k}" for k in ("images", "questions") if k in results)
    print(f"held-out evaluation ({counts}):\n{evaluate.format_scores(results)}")
    with (config.out / "log.jsonl").open("a") as handle:
        record = {"stage": "eval", **{k: v for k, v in results.items() if k != "notes"}}
        handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    return results
