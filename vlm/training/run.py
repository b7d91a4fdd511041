"""A whole run: the parts checked, the stages a config asks for, the bundle saved and
evaluated."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import open_clip
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..calibration import calibration_from_data
from ..data import DataError, FileDataset
from ..device import default_device, half_dtype, training_precision
from ..encoder import Encoder
from ..errors import ConfigError
from ..familiarity import profile_from_data
from ..shapeworld.recipe import DATASETS
from .config import TrainConfig
from .prefix import train_prefix
from .progress import Progress, TrainingStopped
from .stages import train_clip, train_lm


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
        default = 0.0 if config.finetune_lm else dataset.prefix_text_teacher
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
        if config.evaluate and dataset.from_files:
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
    from .. import evaluate

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
