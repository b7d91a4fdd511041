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
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import open_clip
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from .datasets import DATASETS
from .encoder import Encoder
from .factory import build_encoder, build_lm, build_pipeline, clip_config, train_tokenizer

STAGES = ("clip", "lm", "prefix")
BLOCK_SIZE = 64  # LM training sequence length (tokens)

# Model sizes: "small" is the bundled ShapeWorld model, "tiny" is for tests and smoke runs.
SIZES = {
    "small": dict(
        clip=clip_config(image_size=64, patch_size=8, width=96, layers=4, embed_dim=128,
                         text_width=96, text_layers=2, context_length=24),
        lm=dict(n_layer=3, n_embd=96, n_head=3), vocab_size=400,
        # ClipCap's choice for a frozen LM: the transformer mapper
        mapper=dict(kind="transformer", input="tokens", num_tokens=17, prefix_length=20,
                    num_layers=3, num_heads=4),
    ),
    "tiny": dict(
        clip=clip_config(image_size=32, patch_size=8, width=32, layers=1, embed_dim=32,
                         text_width=32, text_layers=1, context_length=24),
        lm=dict(n_layer=2, n_embd=64, n_head=4), vocab_size=300,
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
    clip_steps: int = 1500
    clip_lr: float = 2e-3
    clip_examples: int = 60_000
    lm_steps: int = 3000
    lm_lr: float = 2e-3
    lm_examples: int = 50_000
    lm_batch_size: int = 64  # blocks of BLOCK_SIZE tokens
    prefix_steps: int = 3000
    prefix_batch_size: int = 128
    prefix_lr: float = 1e-3
    prefix_examples: int = 60_000
    checkpoint_every: int = 250
    resume: bool = False
    bundle: Path | None = None  # where the final pipeline goes (default: <out>/pipeline)
    bundle_dtype: str = "float16"


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
) -> torch.nn.Module:
    """Train `module` for `steps` steps of `loss_fn` on `batches(start_step)`, with AdamW, a
    cosine schedule, checkpoints and resume. `check` runs after each backward pass."""
    checkpoint = config.out / "checkpoints" / name
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
    if config.resume and (checkpoint / "step.json").is_file():
        accelerator.load_state(str(checkpoint))
        start = json.loads((checkpoint / "step.json").read_text())["step"]
        accelerator.print(f"[{name}] resuming at step {start}")
    module.train()
    log = config.out / "log.jsonl"
    stream = batches(start)
    bar = tqdm(range(start, steps), desc=name, disable=not accelerator.is_main_process,
               mininterval=2)  # fmt: skip
    tic = time.time()
    for step in bar:
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
            if accelerator.is_main_process:
                record = dict(stage=name, step=step, loss=value, lr=scheduler.get_last_lr()[0])
                record["seconds"] = time.time() - tic
                with log.open("a") as handle:
                    handle.write(json.dumps(record) + "\n")
        if (step + 1) % config.checkpoint_every == 0 or step + 1 == steps:
            accelerator.save_state(str(checkpoint))
            if accelerator.is_main_process:
                (checkpoint / "step.json").write_text(json.dumps({"step": step + 1}))
    module.eval()
    return accelerator.unwrap_model(module)


def _epochs(n: int, batch_size: int, seed: str, pairs: bool = False) -> Iterator[list[int]]:
    """Endless shuffled batches of indices; with `pairs`, items 2i and 2i+1 stay together."""
    rng = random.Random(seed)
    unit = 2 if pairs else 1
    while True:
        order = list(range(n // unit))
        rng.shuffle(order)
        per_batch = max(1, batch_size // unit)
        for i in range(0, len(order) - per_batch + 1, per_batch):
            yield [j * unit + k for j in order[i : i + per_batch] for k in range(unit)]


def split_prompt(text: str, config) -> tuple[str, str]:
    """(prompt, target) of a prefix-stage text: the task prompt the pipeline will give at
    inference ("Caption:", "Question: … Answer:") and what the LM must produce after it."""
    answer_cue = config.question_template.split("{question}")[-1].strip()  # "Answer:"
    if config.caption_prompt and text.startswith(config.caption_prompt):
        return config.caption_prompt, text[len(config.caption_prompt) :]
    if answer_cue and answer_cue in text:
        cut = text.rindex(answer_cue) + len(answer_cue)
        return text[:cut], text[cut:]
    return "", text


def _texts_tensor(
    tokenizer, texts: list[str], device, prompts: list[str] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids of `prompt + text + eos`, right-padded, and labels that score only the text
    and its eos (the prompt is given at inference, so it is not learned)."""
    eos = tokenizer.eos_token_id
    prompts = prompts or [""] * len(texts)
    encode = lambda t: tokenizer(t, add_special_tokens=False)["input_ids"] if t else []  # noqa: E731
    rows = [(encode(p), encode(t) + [eos]) for p, t in zip(prompts, texts, strict=True)]
    length = max(len(p) + len(t) for p, t in rows)
    tokens = torch.full((len(rows), length), eos, dtype=torch.long)
    labels = torch.full((len(rows), length), -100, dtype=torch.long)
    for i, (prompt, target) in enumerate(rows):
        tokens[i, : len(prompt) + len(target)] = torch.tensor(prompt + target)
        labels[i, len(prompt) : len(prompt) + len(target)] = torch.tensor(target)
    return tokens.to(device), labels.to(device)


# ---------------------------------------------------------------------------- the stages


def train_clip(dataset, config: TrainConfig, accelerator: Accelerator) -> Encoder:
    """Stage 1: contrastive image-text training of a small open_clip CLIP."""
    encoder = build_encoder(SIZES[config.size]["clip"])
    data = dataset.clip_data(config.clip_examples, config.seed)
    loss = open_clip.ClipLoss(
        world_size=accelerator.num_processes, rank=accelerator.process_index,
        local_loss=False, gather_with_grad=True,
    )  # fmt: skip
    model = encoder.model.requires_grad_(True)

    def batches(start: int):
        rng = random.Random(f"clip-texts-{config.seed}-{start}")
        indices = _epochs(len(data), config.batch_size, f"clip-{config.seed}-{start}", pairs=True)
        for batch in indices:
            items = [data[i] for i in batch]
            pixels = encoder.pixels([image for image, _ in items])
            tokens = encoder.tokenizer([rng.choice(texts) for _, texts in items])
            yield pixels.to(accelerator.device), tokens.to(accelerator.device)

    def loss_fn(module, batch):
        out = module(*batch)
        return loss(out["image_features"], out["text_features"], out["logit_scale"])

    encoder.model = run_stage("clip", model, loss_fn, batches, config.clip_steps, config.clip_lr,
                              config, accelerator)  # fmt: skip
    encoder.model.requires_grad_(False)
    return encoder


def pack_texts(tokenizer, texts: list[str], block_size: int) -> torch.Tensor:
    """GPT-style packing: all texts, each ended by EOS, cut into [N, block_size] blocks, so
    the LM learns to read text at every position (after a visual prefix, too)."""
    ids: list[int] = []
    for row in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        ids += row + [tokenizer.eos_token_id]
    blocks = len(ids) // block_size
    return torch.tensor(ids[: blocks * block_size]).view(blocks, block_size)


def train_lm(dataset, config: TrainConfig, accelerator: Accelerator):
    """Stage 2: a byte-level BPE tokenizer and a small GPT-2 trained on the dataset's text."""
    texts = dataset.texts(config.lm_examples, config.seed)
    tokenizer = train_tokenizer(texts[:20000], SIZES[config.size]["vocab_size"])
    lm = build_lm(tokenizer, **SIZES[config.size]["lm"])
    blocks = pack_texts(tokenizer, texts, BLOCK_SIZE)

    def batches(start: int):
        for batch in _epochs(len(blocks), config.lm_batch_size, f"lm-{config.seed}-{start}"):
            yield blocks[batch].to(accelerator.device)

    def loss_fn(module, tokens):
        return module(input_ids=tokens, labels=tokens).loss

    lm = run_stage("lm", lm, loss_fn, batches, config.lm_steps, config.lm_lr, config, accelerator)
    return lm, tokenizer


def prefix_loss(lm, prefix: torch.Tensor, tokens: torch.Tensor, labels: torch.Tensor):
    """The LM's next-token loss on the text after the visual prefix (none on the prefix)."""
    inputs = torch.cat([prefix, lm.get_input_embeddings()(tokens)], dim=1)
    ignore = labels.new_full((labels.shape[0], prefix.shape[1]), -100)
    return lm(inputs_embeds=inputs, labels=torch.cat([ignore, labels], dim=1)).loss


def cache_features(pipeline, images, batch_size: int = 256) -> torch.Tensor:
    """What the mapper reads (frozen-encoder features) for every image, computed once and
    kept in fp16."""
    features = []
    for start in tqdm(range(0, len(images), batch_size), desc="features", leave=False):
        batch = [images[i][0] for i in range(start, min(start + batch_size, len(images)))]
        features.append(pipeline.image_features(batch).half().cpu())
    return torch.cat(features)


def train_prefix(dataset, encoder: Encoder, lm, tokenizer, config: TrainConfig, accelerator):
    """Stage 3: the mapper, trained through the frozen LM from frozen-encoder features."""
    size = SIZES[config.size]
    pipeline = build_pipeline(
        encoder, lm, tokenizer, size["mapper"],
        device=accelerator.device, **dataset.pipeline_config(),
    )  # fmt: skip
    frozen = [*pipeline.encoder.model.parameters(), *pipeline.lm.parameters()]
    assert not any(p.requires_grad for p in frozen), "encoder and LM must be frozen"
    data = dataset.prefix_data(config.prefix_examples, config.seed)
    features = cache_features(pipeline, data)  # the encoder is frozen: embed once

    def batches(start: int):
        rng = random.Random(f"prefix-texts-{config.seed}-{start}")
        for batch in _epochs(len(data), config.prefix_batch_size, f"prefix-{config.seed}-{start}"):
            pairs = [split_prompt(rng.choice(data.texts[i]), pipeline.config) for i in batch]
            prompts, targets = [p for p, _ in pairs], [t for _, t in pairs]
            yield (
                features[batch].float().to(accelerator.device),
                _texts_tensor(tokenizer, targets, accelerator.device, prompts),
            )

    def loss_fn(mapper, batch):
        embedding, (tokens, labels) = batch
        return prefix_loss(pipeline.lm, mapper(embedding), tokens, labels)

    def check():  # the method's promise: nothing but the mapper learns
        assert all(p.grad is None for p in frozen), "a gradient reached the encoder or the LM"

    mapper = pipeline.mapper.requires_grad_(True)
    pipeline.mapper = run_stage("prefix", mapper, loss_fn, batches, config.prefix_steps,
                                config.prefix_lr, config, accelerator, check)  # fmt: skip
    return pipeline


# ---------------------------------------------------------------------------- the whole run


def train(config: TrainConfig):
    """Run the requested stages; finished stages are loaded from `<out>` instead of rerun."""
    accelerator = Accelerator()
    set_seed(config.seed)
    config.out.mkdir(parents=True, exist_ok=True)
    dataset = DATASETS[config.dataset]()
    encoder_dir, lm_dir = config.out / "encoder", config.out / "lm"
    tic = time.time()

    if "clip" in config.stages and not (config.resume and (encoder_dir / "done").exists()):
        encoder = train_clip(dataset, config, accelerator)
        if accelerator.is_main_process:
            encoder.save(encoder_dir)
            (encoder_dir / "done").touch()
    accelerator.wait_for_everyone()

    if "lm" in config.stages and not (config.resume and (lm_dir / "done").exists()):
        lm, tokenizer = train_lm(dataset, config, accelerator)
        if accelerator.is_main_process:
            lm.save_pretrained(lm_dir)
            tokenizer.save_pretrained(lm_dir)
            (lm_dir / "done").touch()
    accelerator.wait_for_everyone()
    if "prefix" not in config.stages:
        return None
    encoder = Encoder.load({"model": f"local-dir:{encoder_dir.resolve()}"})
    lm = AutoModelForCausalLM.from_pretrained(lm_dir, dtype=torch.float32).requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(lm_dir)
    pipeline = train_prefix(dataset, encoder, lm, tokenizer, config, accelerator)
    if accelerator.is_main_process:
        bundle = config.bundle or config.out / "pipeline"
        pipeline.save_pretrained(bundle, dtype=getattr(torch, config.bundle_dtype))
        accelerator.print(f"saved {bundle} after {time.time() - tic:.0f} s")
    return pipeline
