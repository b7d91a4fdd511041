"""The stage loop: one module trained with a schedule, logged, checkpointed and resumable,
on a CPU, a GPU or several (accelerate)."""

from __future__ import annotations

import dataclasses
import json
import math
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from ..errors import InputError
from .config import TrainConfig
from .progress import Progress, TrainingStopped


def schedule(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10%."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


@dataclasses.dataclass
class Stage:
    """One stage as the loop runs it, a recipe of what trains and on what: `module` for
    `steps` steps of `loss(module, batch)` on `batches(start_step)` at learning rate `lr`.
    `batch_size` (all processes together) is for the log's samples and samples/s;
    `validate(module)` gives the held-out loss; `check` runs after each backward pass."""

    name: str
    module: torch.nn.Module
    loss: Callable[[torch.nn.Module, object], torch.Tensor]
    batches: Callable[[int], Iterator]
    steps: int
    lr: float
    batch_size: int = 0
    validate: Callable[[torch.nn.Module], float] | None = None
    check: Callable[[], None] | None = None


def run_stage(
    stage: Stage,
    config: TrainConfig,
    accelerator: Accelerator,
    *,
    until: int | None = None,
    resume: bool | None = None,
    progress: Progress | None = None,
) -> torch.nn.Module:
    """Train `stage.module` as the stage says, with AdamW, a cosine schedule, checkpoints and
    resume; the trained module. The held-out loss is logged every `config.val_every` steps;
    with `config.early_stopping` the stage stops when it has not improved that many times in
    a row and keeps the weights of its best validation. `until`: stop after that many of the
    steps (a checkpoint there, the schedule still the whole stage's); `resume` overrides
    `config.resume`. `progress` hears of every step, validation, sample and checkpoint, and
    may stop the stage (a checkpoint, then `TrainingStopped`)."""
    name, module, loss_fn, batches = stage.name, stage.module, stage.loss, stage.batches
    steps, lr, batch_size = stage.steps, stage.lr, stage.batch_size
    validate, check = stage.validate, stage.check
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
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: schedule(s, steps, warmup))
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


def epoch_batches(
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


def checkpoint_layers(lm) -> None:
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
