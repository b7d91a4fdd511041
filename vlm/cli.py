"""`python -m vlm …`: caption, classify, answer, index, search, train and eval from a shell."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import sys
from pathlib import Path

DEFAULT_MODEL = "shapeworld"


def _model(args):
    from .pipeline import Pipeline

    return Pipeline.from_pretrained(args.model)


def _files(paths: list[str], videos: bool = False):
    """The image files among `paths` (folders searched); with `videos`, (images, video
    files) — a video is named as a file."""
    from .images import list_images
    from .video import is_video_path

    missing = [p for p in paths if not Path(p).exists()]
    if missing:
        _fail("no such file or folder: " + ", ".join(missing))
    clips = [Path(p) for p in paths if videos and Path(p).is_file() and is_video_path(p)]
    files = list_images([p for p in paths if Path(p) not in clips])
    if not files and not clips:
        _fail("no image files found in " + " ".join(paths))
    return (files, clips) if videos else files


def _videos(args, pipeline, clips: list[Path], question: str | None = None) -> list[dict]:
    """Each video described (or its question answered), its frames' familiarity on stderr;
    a row per video: the text, the times of the frames read, each frame's caption."""
    rows = []
    for clip in clips:
        options = dict(fps=args.fps, max_frames=args.max_frames, timeline=question is None)
        if question is None:
            result = pipeline.describe_video(clip, **options)
        else:
            result = pipeline.answer_video(clip, question, **options)
        if result.guess:
            name = pipeline.config.name or "this model"
            print(f"{clip}: {name} was not trained on videos: what it says happened is a guess "
                  "from frames it reads one at a time", file=sys.stderr)  # fmt: skip
        frames = [f"{clip}@{t:.1f}s" for t, _ in result.familiarity]
        _warn_unfamiliar(pipeline, frames, [known for _, known in result.familiarity])
        timeline = [{"time": t, "caption": c} for t, c in result.timeline]
        rows.append({"video": str(clip), "text": result.text, "frames": result.times,
                     "timeline": timeline, "confidence": result.confidence})  # fmt: skip
    return rows


def _video_text(row: dict) -> str:
    sure = row.get("confidence")  # calibrated (None: the model has no calibration for videos)
    lines = [f"{row['video']}\t{row['text']}" + ("" if sure is None else f"\t({sure:.0%} sure)")]
    lines += [f"  {int(t['time']) // 60}:{int(t['time']) % 60:02d}\t{t['caption']}"
              for t in row["timeline"]]  # fmt: skip
    return "\n".join(lines)


def _emit(args, rows: list[dict], text: callable) -> None:
    if args.json:
        print(json.dumps(rows, indent=2, ensure_ascii=False))
    else:
        for row in rows:
            print(text(row))


def _warn_unfamiliar(pipeline, files, known=None) -> None:
    """On stderr, each image unlike what the model was trained on (its familiarity profile),
    or that the model cannot tell (no profile): what stdout says of those is a guess.
    `known`: the images' familiarity where it is known already (a video's frames)."""
    name = pipeline.config.name or "this model"
    known = pipeline.familiarity(files) if known is None else known
    for path, one in zip(files, known, strict=True):
        if one.familiar is None:
            print(f"{path}: {name} has no profile of its training images: familiarity "
                  "unknown", file=sys.stderr)  # fmt: skip
        elif not one.familiar:
            print(f"{path}: unlike anything {name} was trained on (familiarity "
                  f"{one.score:.3f}): what follows is a guess", file=sys.stderr)  # fmt: skip


def cmd_caption(args) -> None:
    pipeline, (files, clips) = _model(args), _files(args.images, videos=True)
    if clips:  # videos: described, each sampled frame captioned
        rows = _videos(args, pipeline, clips)
        _emit(args, rows, _video_text)
        if not files:
            return
    _warn_unfamiliar(pipeline, files)
    options = dict(
        max_new_tokens=args.max_new_tokens, num_beams=args.num_beams, do_sample=args.sample,
        temperature=args.temperature, top_p=args.top_p,
    )  # fmt: skip
    if args.stream and not args.json:
        from .streaming import print_stream

        for f in files:
            print_stream(pipeline.stream_caption(f, **options), f"{f}\t")
        return
    captions = pipeline.caption(files, **options)
    rows = [{"image": str(f), "caption": c} for f, c in zip(files, captions, strict=True)]
    _emit(args, rows, lambda r: f"{r['image']}\t{r['caption']}")


def cmd_classify(args) -> None:
    pipeline, files = _model(args), _files(args.images)
    _warn_unfamiliar(pipeline, files)
    labels = [label.strip() for label in args.labels.split(",") if label.strip()]
    results = pipeline.classify(files, labels)
    rows = [{"image": str(f), "labels": r} for f, r in zip(files, results, strict=True)]

    def text(row):
        best = list(row["labels"].items())[: args.top]
        return row["image"] + "\t" + ", ".join(f"{k} {v:.3f}" for k, v in best)

    _emit(args, rows, text)


def cmd_answer(args) -> None:
    pipeline, (files, clips) = _model(args), _files(args.images, videos=True)
    if clips:
        rows = _videos(args, pipeline, clips, args.question)
        _emit(args, rows, lambda r: f"{r['video']}\t{r['text']}")
        if not files:
            return
    _warn_unfamiliar(pipeline, files)
    choices = [c for c in args.choices.split(",")] if args.choices else None
    if args.stream and not args.json and not choices:
        from .streaming import print_stream

        for f in files:
            print_stream(pipeline.stream_answer(f, args.question), f"{f}\t")
        return
    results = pipeline.answer(files, args.question, choices, return_scores=True)
    rows = [
        {"image": str(f), "question": args.question, "answer": a, "scores": s}
        for f, (a, s) in zip(files, results, strict=True)
    ]
    _emit(args, rows, lambda r: f"{r['image']}\t{r['answer']}")


def cmd_index(args) -> None:
    from .serve import open_index

    pipeline = _model(args)
    out = Path(args.out)
    index = open_index(out, pipeline, factory=args.factory)
    added = index.add(args.images, batch_size=args.batch_size)
    index.save(out)
    for item, reason in index.skipped:
        print(f"skipped {item}: {reason}", file=sys.stderr)
    print(f"added {added} images; {len(index)} in {out}")


def cmd_search(args) -> None:
    from .search import SearchIndex

    pipeline = _model(args)
    index = SearchIndex.load(args.index, pipeline.encoder)
    query = Path(args.query) if Path(args.query).is_file() else args.query
    hits = index.search(query, k=args.k)
    rows = [dataclasses.asdict(h) for h in hits]
    _emit(args, rows, lambda r: f"{r['score']:.4f}\t{r['item']}")


def cmd_shapeworld_data(args) -> None:
    from .shapeworld import write_captioned_folder

    if not 1 <= args.n <= 100_000:
        _fail(f"--n {args.n}: write between 1 and 100000 scenes")
    written = write_captioned_folder(args.out, args.n, seed=args.seed, size=args.size)
    print(f"wrote {len(written)} images with captions to {args.out}")


def cmd_profile(args) -> None:
    from .calibration import calibration_from_data
    from .data import FileDataset
    from .familiarity import profile_from_data
    from .pipeline import Pipeline
    from .shapeworld.recipe import DATASETS

    folder = Path(args.model)
    if not folder.is_dir():
        _fail(f"{folder}: not a saved model folder (the profile is written into it)")
    pipeline = Pipeline.from_pretrained(folder)
    if args.data in DATASETS:
        dataset = DATASETS[args.data]()
    else:
        dataset = FileDataset([args.data], val_fraction=args.val_fraction)
    profile = profile_from_data(pipeline.encoder, dataset, n=args.n, seed=args.seed)
    print(f"wrote {profile.save(folder)} ({len(profile.reference)} reference images; "
          f"flags the {profile.false_alarms:.0%} least typical)")  # fmt: skip
    calibration = calibration_from_data(pipeline, dataset, n=args.n_calibration, seed=args.seed)
    if calibration is None:
        print("no held-out examples: no calibration written (--val-fraction)")
    else:
        print(f"wrote {calibration.save(folder)} (fitted on {calibration.fitted_on})")


def cmd_train(args) -> None:
    from .training import MODEL_SIZES, STAGES, TrainConfig, train
    from .training.config import CLIPCAP_MAPPER

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    options = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    options["out"] = Path(args.out)
    options["stages"] = tuple(args.stages.split(",")) if args.stages else STAGES
    for name in ("bundle", "images", "feature_cache"):
        if getattr(args, name):
            options[name] = Path(getattr(args, name))
    options["data"] = tuple(args.data or ())
    options["val_data"] = tuple(args.val_data or ())
    if not args.data and args.dataset != "shapeworld":
        options["data"] = (args.dataset,)  # a path given where a dataset name goes
    mapper = {k: v for k, v in [("kind", args.mapper), ("prefix_length", args.prefix_length),
              ("num_layers", args.mapper_layers), ("input", args.mapper_input),
              ("num_tokens", args.num_tokens)] if v}  # fmt: skip
    if args.reads_prompt is not None:
        mapper["reads_prompt"] = args.reads_prompt
    if mapper:
        base = CLIPCAP_MAPPER if args.lm else MODEL_SIZES[args.size or "small"]["mapper"]
        options["mapper"] = {**base, **mapper}
        if mapper.get("kind") == "mlp":
            options["mapper"] = {k: v for k, v in options["mapper"].items()
                                 if k in ("kind", "prefix_length", "reads_prompt")}  # fmt: skip
    train(TrainConfig(**options))


def cmd_eval(args) -> None:
    from . import evaluate

    pipeline = _model(args)
    if args.dataset == "shapeworld":
        from .shapeworld.evaluation import evaluate_shapeworld, evaluate_video, format_table

        measure = evaluate_video if args.video else evaluate_shapeworld
        results = measure(pipeline, n=args.n, seed=args.seed)
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=2))
        print(json.dumps(results, indent=2) if args.json else format_table(results))
        return
    if not args.data:
        _fail(f"eval {args.dataset} needs --data")
    # pycocoevalcap prints its working to stdout: keep stdout for the results (--json)
    with contextlib.redirect_stdout(sys.stderr):
        if args.dataset == "zeroshot":
            results = evaluate.evaluate_zeroshot(pipeline, args.data, batch_size=args.batch_size)
        else:
            from .data import read_examples

            source = read_examples(args.data, args.data_format, split=args.split or "test",
                                   images=args.images)  # fmt: skip
            examples = list(itertools.islice(source, args.limit))
            limit = {"max_new_tokens": args.max_new_tokens} if args.max_new_tokens else {}
            if args.dataset == "captions":
                results = evaluate.evaluate_captions(pipeline, examples, batch_size=args.batch_size,
                                                     num_beams=args.num_beams, strict=args.strict,
                                                     **limit)  # fmt: skip
            else:
                results = evaluate.evaluate_vqa(pipeline, examples, batch_size=args.batch_size,
                                                strict=args.strict, **limit)  # fmt: skip
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2, ensure_ascii=False))
    if args.json:
        print(json.dumps({k: v for k, v in results.items() if k != "predictions"}, indent=2))
    else:
        print(evaluate.format_scores(results))


TRAIN_HELP = {  # the numeric TrainConfig knobs: (flag help); defaults come from TrainConfig
    "seed": "random seed",
    "batch_size": "clip stage: image-text pairs a step",
    "lm_batch_size": "lm stage: blocks of the LM's length (128 tokens) a step",
    "lm_positions": "lm stage: the LM's positions (default: the size's, small 128)",
    "prefix_batch_size": "prefix stage: (image, text) pairs a step (all processes together)",
    "checkpoint_every": "steps between checkpoints (--resume starts from the last one)",
    "clip_steps": "clip stage: steps",
    "clip_lr": "clip stage: peak learning rate",
    "clip_examples": "clip stage: rendered scenes (shapeworld)",
    "clip_caption_weight": "clip stage: weight of CoCa's captioning loss (0: off)",
    "lm_steps": "lm stage: steps (fewer steps memorise less; see --early-stopping)",
    "lm_lr": "lm stage: peak learning rate",
    "lm_examples": "lm stage: text documents (shapeworld)",
    "lm_answer_weight": "lm stage: loss weight of answer tokens against the rest",
    "lm_candidates": "lm stage: LMs trained from their own initialisations; the one with the "
    "lowest loss on held-out text after --lm-select-steps goes on (1: no selection)",
    "lm_select_steps": "lm stage: steps each candidate trains before the choice",
    "prefix_steps": "prefix stage: steps",
    "prefix_lr": "prefix stage: peak learning rate",
    "prefix_examples": "prefix stage: rendered scenes (shapeworld)",
    "prefix_epochs": "prefix stage: epochs over the (image, text) pairs; replaces --prefix-steps",
    "prefix_context": "prefix stage: share of batches with two (image, text) items a row, the "
    "second read after the first as in a k-shot list (default: the dataset's; files: 0)",
    "prefix_text_teacher": "prefix stage: weight of the text teacher, the frozen LM reading the "
    "image's caption as text (shapeworld, with a mapper that reads the question: the caption "
    "of the one object a question is about), whose next-token distributions over each "
    "question it answers after the prefix are matched (KL) (0: off; default: the dataset's, "
    "shapeworld 1.0, with a frozen LM; files: 0)",
    "val_fraction": "file data: fraction of the images held out for validation when there is "
    "no --val-data (Karpathy data: its val split; 0: none)",
    "val_every": "steps between validation losses in log.jsonl (0: none)",
    "early_stopping": "stop a stage after this many validations without a lower loss, keeping "
    "its best weights (0: off)",
    "max_new_tokens": "held-out evaluation: longest caption, in tokens",
}


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Every flag's help ends with its default, unless the help already says it or there is
    none to say (a switch that is off, an optional path)."""

    def _get_help_string(self, action):
        help = action.help or ""
        if "default" in help or action.default in (None, False, argparse.SUPPRESS):
            return help
        return help + " (default: %(default)s)"


def _fail(message: str) -> None:
    """One line on stderr and exit status 2, as argparse does for a bad flag."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def main(argv: list[str] | None = None) -> None:
    from .data import FORMATS
    from .training import TrainConfig

    formatter = _Help
    description = __doc__.replace("`python -m vlm …`", "vlm (or python -m vlm)")
    parser = argparse.ArgumentParser(prog="vlm", formatter_class=formatter, description=description)
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name: str, func, help: str, images: bool = True):
        sub = commands.add_parser(name, help=help, description=help, formatter_class=formatter)
        sub.set_defaults(func=func)
        sub.add_argument("--model", default=DEFAULT_MODEL, help="preset, saved folder or hub id")
        sub.add_argument("--json", action="store_true", help="print JSON")
        if images:
            sub.add_argument("images", nargs="+", help="image files or folders")
        return sub

    def video_flags(sub) -> None:
        sub.add_argument("--fps", type=float, default=1.0, help="videos: frames read a second")
        sub.add_argument("--max-frames", type=int, default=16,
                         help="videos: most frames read (spread over a longer clip)")  # fmt: skip

    sub = command("caption", cmd_caption, "caption images; describe videos (.mp4, .webm, …)")
    video_flags(sub)
    sub.add_argument("--max-new-tokens", type=int, default=30, help="longest caption, in tokens")
    sub.add_argument("--num-beams", type=int, default=1, help="beam search width (1: greedy)")
    sub.add_argument("--sample", action="store_true", help="nucleus sampling instead")
    sub.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    sub.add_argument("--top-p", type=float, default=0.9, help="sampling: nucleus mass")
    sub.add_argument("--stream", action="store_true", help="print each caption as it is written")
    sub = command("classify", cmd_classify, "zero-shot classification")
    sub.add_argument("--labels", required=True, help="comma-separated labels")
    sub.add_argument("--top", type=int, default=3, help="labels printed per image")
    sub = command("answer", cmd_answer, "answer a question about images or videos")
    video_flags(sub)
    sub.add_argument("--question", required=True, help="the question, asked of every image")
    sub.add_argument("--choices", help="comma-separated answers to choose from (else free text)")
    sub.add_argument("--stream", action="store_true", help="print each answer as it is written")
    sub = command("index", cmd_index, "build or extend a search index")
    sub.add_argument("--out", required=True, help="index folder")
    sub.add_argument("--batch-size", type=int, default=32, help="images encoded at once")
    sub.add_argument("--factory", default="Flat", help="FAISS index_factory string")
    sub = command("search", cmd_search, "search an index by text or image", images=False)
    sub.add_argument("index", help="index folder")
    sub.add_argument("query", help="text, or the path of an image")
    sub.add_argument("-k", type=int, default=5, help="results")

    sub = commands.add_parser(
        "profile", formatter_class=formatter,
        help="write a model folder's familiarity profile and calibration",
        description="Write into a model folder the profile that tells images like its training "
        "images from others, and the calibration that turns its raw probabilities into the "
        "chance of being right (vlm train writes both; this adds them to a folder without)",
    )  # fmt: skip
    sub.set_defaults(func=cmd_profile)
    sub.add_argument("--model", required=True, help="the saved model folder")
    sub.add_argument("--data", required=True, help="'shapeworld' or the training data file")
    sub.add_argument("--n", type=int, default=3000, help="training images to fit")
    sub.add_argument("--n-calibration", type=int, default=2000,
                     help="held-out examples to fit the calibration on")  # fmt: skip
    sub.add_argument("--seed", type=int, default=0, help="the training run's seed")
    sub.add_argument("--val-fraction", type=float, help="files: the held-out part")

    sub = commands.add_parser(
        "shapeworld-data", formatter_class=formatter,
        help="write a folder of captioned ShapeWorld scenes to train on",
        description="Write ShapeWorld scenes as PNGs, each with a .txt of two captions in "
        "everyday words: a folder as `vlm train --data` reads one, to try training on before "
        "using your own images",
    )  # fmt: skip
    sub.set_defaults(func=cmd_shapeworld_data)
    sub.add_argument("out", help="the folder to write")
    sub.add_argument("--n", type=int, default=300, help="how many scenes")
    sub.add_argument("--seed", type=int, default=0, help="which scenes")
    sub.add_argument("--size", type=int, default=64, choices=[32, 64, 128], help="pixels a side")

    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    sub = commands.add_parser(
        "train", help="train a model (stages clip, lm, prefix)", formatter_class=formatter,
        description="Train a model: on ShapeWorld, all three stages; on your own data "
        "(--data), the stages whose part is not given (--encoder, --lm).",
    )  # fmt: skip
    sub.set_defaults(func=cmd_train)
    sub.add_argument("dataset", nargs="?", default="shapeworld",
                     help="shapeworld, or a data file/folder (same as --data)")  # fmt: skip
    sub.add_argument("--out", required=True, help="run folder (checkpoints, log.jsonl, parts)")
    sub.add_argument("--bundle", help="where to save the final pipeline (default <out>/pipeline)")
    sub.add_argument("--stages", help="comma-separated subset of clip,lm,prefix "
                     "(default: all that have no pretrained part)")  # fmt: skip
    sub.add_argument("--size", choices=["small", "tiny"], default="small",
                     help="model sizes of the trained parts (tiny: for tests)")  # fmt: skip
    sub.add_argument("--resume", action="store_true", default=None,
                     help="continue from <out>'s checkpoints")  # fmt: skip
    data = sub.add_argument_group("your own data (formats: see vlm/data.py)")
    data.add_argument("--data", action="append", help="dataset file or folder (repeatable): "
                      "CSV/TSV, a folder of images with sidecar .txt captions, COCO or Karpathy "
                      "JSON, WebDataset, Q/A JSON")  # fmt: skip
    data.add_argument("--data-format", choices=["auto", *FORMATS], default="auto",
                      help="the format of --data (auto: guessed from the path)")  # fmt: skip
    data.add_argument("--split", default="train", help="Karpathy split to train on")
    data.add_argument("--images", help="image root, if paths in the data are relative to it "
                      "(default: the data file's folder)")  # fmt: skip
    data.add_argument("--limit", type=int, help="use at most this many examples (default: all)")
    data.add_argument("--val-data", action="append", help="validation file or folder "
                      "(repeatable; default: --val-fraction of --data)")  # fmt: skip
    data.add_argument("--no-eval", dest="evaluate", action="store_false", default=None,
                      help="don't score the held-out part at the end")  # fmt: skip
    data.add_argument("--strict", action="store_true", default=None,
                      help="stop at the first bad row (missing or unreadable image) instead of "
                      "skipping and counting it")  # fmt: skip
    data.add_argument("--feature-cache", help="folder of cached image features "
                      "(default <out>/features)")  # fmt: skip
    data.add_argument("--features-in-memory", action="store_true", default=None,
                      help="keep image features in memory instead of a disk cache")  # fmt: skip
    parts = sub.add_argument_group("pretrained parts (frozen; their stages are skipped)")
    parts.add_argument("--encoder", help="open_clip model name (ViT-B-32-quickgelu), or "
                       "local-dir:<folder> for a saved open_clip folder "
                       "(default: train one on the data)")  # fmt: skip
    parts.add_argument("--encoder-pretrained", help="open_clip pretrained tag (openai) or "
                       "weights file")  # fmt: skip
    parts.add_argument("--lm", help="Hugging Face causal LM: a saved folder, or a hub id "
                       "(needs the network once) (default: train a small one on the data's "
                       "text)")  # fmt: skip
    parts.add_argument("--mapper", choices=["mlp", "transformer"],
                       help="mapper kind (default: ClipCap's transformer with --lm, else the "
                       "size's)")  # fmt: skip
    parts.add_argument("--prefix-length", type=int, help="visual prefix vectors "
                       "(default: ClipCap's 10 with --lm, else the size's)")  # fmt: skip
    parts.add_argument("--mapper-layers", type=int, help="transformer mapper layers "
                       "(default: ClipCap's 8 with --lm, else the size's)")  # fmt: skip
    parts.add_argument("--mapper-input", choices=["embedding", "tokens"],
                       help="what the transformer mapper reads: the pooled embedding, or it "
                       "and the ViT's patch tokens")  # fmt: skip
    parts.add_argument("--num-tokens", type=int,
                       help="--mapper-input tokens: 1 + grid² image tokens (default: the "
                       "encoder's full patch grid)")  # fmt: skip
    parts.add_argument("--reads-prompt", action=argparse.BooleanOptionalAction,
                       help="transformer mapper: also read the task prompt (the frozen LM's "
                       "hidden states of 'Caption:' or the question), InstructBLIP-style "
                       "(default: on for --size small, the bundle's; off otherwise)")  # fmt: skip
    parts.add_argument("--gradient-checkpointing", action="store_true", default=None,
                       help="recompute the LM's activations (less memory for big LMs)")  # fmt: skip
    parts.add_argument("--push-to-hub", help="hub repo id to upload the final pipeline to")
    parts.add_argument("--finetune-lm", action="store_true", default=None,
                       help="ablation: train the LM together with the mapper in the prefix stage "
                       "(ClipCap's other variant) instead of keeping it frozen")  # fmt: skip
    knobs = sub.add_argument_group("steps and rates")
    for name, kind in [
        ("seed", int), ("batch_size", int), ("lm_batch_size", int), ("lm_positions", int),
        ("prefix_batch_size", int),
        ("checkpoint_every", int),
        ("clip_steps", int), ("clip_lr", float), ("clip_examples", int),
        ("clip_caption_weight", float),
        ("lm_steps", int), ("lm_lr", float), ("lm_examples", int), ("lm_answer_weight", float),
        ("lm_candidates", int), ("lm_select_steps", int),
        ("prefix_steps", int), ("prefix_lr", float), ("prefix_examples", int),
        ("prefix_epochs", float), ("prefix_context", float), ("prefix_text_teacher", float),
        ("val_fraction", float), ("val_every", int),
        ("early_stopping", int), ("max_new_tokens", int),
    ]:  # fmt: skip
        group = data if name in ("val_fraction", "val_every", "early_stopping") else knobs
        default = defaults[name]
        help = TRAIN_HELP[name] + ("" if default is None else f" (default: {default})")
        group.add_argument("--" + name.replace("_", "-"), type=kind, help=help,
                           default=argparse.SUPPRESS)  # fmt: skip

    sub = commands.add_parser("eval", help="evaluate a model", description="evaluate a model",
                              formatter_class=formatter)  # fmt: skip
    sub.set_defaults(func=cmd_eval)
    sub.add_argument("dataset", choices=["shapeworld", "captions", "zeroshot", "vqa"],
                     help="what to measure")  # fmt: skip
    sub.add_argument("--model", default=DEFAULT_MODEL, help="preset, saved folder or hub id")
    sub.add_argument("--json", action="store_true", help="print JSON")
    sub.add_argument("--n", type=int, default=1000, help="shapeworld: scenes per measure")
    sub.add_argument("--seed", type=int, default=1234, help="shapeworld: scene seed")
    sub.add_argument(
        "--video",
        action="store_true",
        help="shapeworld: fresh clips instead (descriptions, questions; --n a slice)",
    )
    sub.add_argument("--split", help="Karpathy data: its split (default test)")
    sub.add_argument("--data", help="captions/vqa: dataset file or folder; zeroshot: a folder of "
                     "one subfolder per class")  # fmt: skip
    sub.add_argument("--data-format", default="auto", choices=["auto", *FORMATS],
                     help="the format of --data (auto: guessed from the path)")  # fmt: skip
    sub.add_argument("--images", help="image root, if paths in the data are relative to it")
    sub.add_argument("--limit", type=int, help="evaluate on at most this many images "
                     "(default: all)")  # fmt: skip
    sub.add_argument("--batch-size", type=int, default=32, help="images at once")
    sub.add_argument("--num-beams", type=int, default=1, help="beam search width (1: greedy)")
    sub.add_argument("--max-new-tokens", type=int,
                     help="longest caption / answer in tokens (default 60 / 10); a warning says "
                     "how many outputs reached it")  # fmt: skip
    sub.add_argument("--strict", action="store_true", help="stop at the first bad row "
                     "instead of skipping and counting it")  # fmt: skip
    sub.add_argument("--out", help="write scores and every prediction here as JSON")

    args = parser.parse_args(argv)
    from .errors import VLMError

    try:
        args.func(args)
    except (VLMError, FileNotFoundError) as error:  # the user's to fix; anything else is a bug
        _fail(str(error))
