"""`python -m vlm …`: caption, classify, answer, index, search, train and eval from a shell."""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys
from pathlib import Path

DEFAULT_MODEL = "shapeworld"


def _model(args):
    from .pipeline import Pipeline

    return Pipeline.from_pretrained(args.model)


def _files(paths: list[str]) -> list[Path]:
    from .images import list_images

    missing = [p for p in paths if not Path(p).exists()]
    if missing:
        raise SystemExit("error: no such file or folder: " + ", ".join(missing))
    files = list_images(paths)
    if not files:
        raise SystemExit("error: no image files found in " + " ".join(paths))
    return files


def _emit(args, rows: list[dict], text: callable) -> None:
    if args.json:
        print(json.dumps(rows, indent=2, ensure_ascii=False))
    else:
        for row in rows:
            print(text(row))


def cmd_caption(args) -> None:
    pipeline, files = _model(args), _files(args.images)
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
    labels = [label.strip() for label in args.labels.split(",") if label.strip()]
    results = pipeline.classify(files, labels)
    rows = [{"image": str(f), "labels": r} for f, r in zip(files, results, strict=True)]

    def text(row):
        best = list(row["labels"].items())[: args.top]
        return row["image"] + "\t" + ", ".join(f"{k} {v:.3f}" for k, v in best)

    _emit(args, rows, text)


def cmd_answer(args) -> None:
    pipeline, files = _model(args), _files(args.images)
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
    from .search import SearchIndex

    pipeline = _model(args)
    out = Path(args.out)
    index = (
        SearchIndex.load(out, pipeline.encoder)
        if (out / "manifest.json").exists()
        else SearchIndex(pipeline.encoder, factory=args.factory)
    )
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


def cmd_train(args) -> None:
    from .train import CLIPCAP_MAPPER, SIZES, STAGES, TrainConfig, train

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    options = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    options["out"] = Path(args.out)
    options["stages"] = tuple(args.stages.split(",")) if args.stages else STAGES
    for name in ("bundle", "images", "feature_cache"):
        if getattr(args, name):
            options[name] = Path(getattr(args, name))
    options["data"] = tuple(args.data or ())
    if not args.data and args.dataset != "shapeworld":
        options["data"] = (args.dataset,)  # a path given where a dataset name goes
    mapper = {k: v for k, v in [("kind", args.mapper), ("prefix_length", args.prefix_length),
              ("num_layers", args.mapper_layers), ("input", args.mapper_input)] if v}  # fmt: skip
    if mapper:
        base = CLIPCAP_MAPPER if args.lm else SIZES[args.size or "small"]["mapper"]
        options["mapper"] = {**base, **mapper}
        if mapper.get("kind") == "mlp":
            options["mapper"] = {k: v for k, v in options["mapper"].items()
                                 if k in ("kind", "prefix_length")}  # fmt: skip
    train(TrainConfig(**options))


def cmd_eval(args) -> None:
    from . import evaluate

    pipeline = _model(args)
    if args.dataset == "shapeworld":
        results = evaluate.evaluate_shapeworld(pipeline, n=args.n, seed=args.seed,
                                               split=args.split or "train")  # fmt: skip
        print(json.dumps(results, indent=2) if args.json else evaluate.format_table(results))
        return
    if not args.data:
        raise SystemExit(f"error: eval {args.dataset} needs --data")
    if args.dataset == "zeroshot":
        results = evaluate.evaluate_zeroshot(pipeline, args.data, batch_size=args.batch_size)
    else:
        from .data import read_examples

        source = read_examples(args.data, args.data_format, split=args.split or "test",
                               images=args.images)  # fmt: skip
        examples = list(itertools.islice(source, args.limit))
        if args.dataset == "captions":
            results = evaluate.evaluate_captions(pipeline, examples, batch_size=args.batch_size,
                                                 num_beams=args.num_beams)  # fmt: skip
        else:
            results = evaluate.evaluate_vqa(pipeline, examples, batch_size=args.batch_size)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2, ensure_ascii=False))
    if args.json:
        print(json.dumps({k: v for k, v in results.items() if k != "predictions"}, indent=2))
    else:
        print(evaluate.format_scores(results))


def main(argv: list[str] | None = None) -> None:
    from .data import FORMATS

    parser = argparse.ArgumentParser(prog="python -m vlm", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name: str, func, help: str, images: bool = True):
        sub = commands.add_parser(name, help=help)
        sub.set_defaults(func=func)
        sub.add_argument("--model", default=DEFAULT_MODEL, help="preset, folder or hub id")
        sub.add_argument("--json", action="store_true", help="print JSON")
        if images:
            sub.add_argument("images", nargs="+", help="image files or folders")
        return sub

    sub = command("caption", cmd_caption, "caption images")
    sub.add_argument("--max-new-tokens", type=int, default=30)
    sub.add_argument("--num-beams", type=int, default=1)
    sub.add_argument("--sample", action="store_true", help="nucleus sampling")
    sub.add_argument("--temperature", type=float, default=1.0)
    sub.add_argument("--top-p", type=float, default=0.9)
    sub.add_argument("--stream", action="store_true", help="print each caption as it is written")
    sub = command("classify", cmd_classify, "zero-shot classification")
    sub.add_argument("--labels", required=True, help="comma-separated labels")
    sub.add_argument("--top", type=int, default=3)
    sub = command("answer", cmd_answer, "answer a question about images")
    sub.add_argument("--question", required=True)
    sub.add_argument("--choices", help="comma-separated answers to choose from")
    sub.add_argument("--stream", action="store_true", help="print each answer as it is written")
    sub = command("index", cmd_index, "build or extend a search index")
    sub.add_argument("--out", required=True, help="index folder")
    sub.add_argument("--batch-size", type=int, default=32)
    sub.add_argument("--factory", default="Flat", help="FAISS index_factory string")
    sub = command("search", cmd_search, "search an index by text or image", images=False)
    sub.add_argument("index", help="index folder")
    sub.add_argument("query", help="text, or the path of an image")
    sub.add_argument("-k", type=int, default=5)

    sub = commands.add_parser("train", help="train a model (stages clip, lm, prefix)")
    sub.set_defaults(func=cmd_train)
    sub.add_argument("dataset", nargs="?", default="shapeworld",
                     help="shapeworld, or a data file/folder (same as --data)")  # fmt: skip
    sub.add_argument("--out", required=True, help="run folder (checkpoints, logs, parts)")
    sub.add_argument("--bundle", help="where to save the final pipeline")
    sub.add_argument("--stages", help="comma-separated subset of clip,lm,prefix")
    sub.add_argument("--size", choices=["small", "tiny"])
    sub.add_argument("--resume", action="store_true", default=None)
    data = sub.add_argument_group("real data (see vlm/data.py for the formats)")
    data.add_argument("--data", action="append", help="dataset file or folder (repeatable)")
    data.add_argument("--data-format", choices=["auto", *FORMATS])
    data.add_argument("--split", help="Karpathy split to train on (default: train)")
    data.add_argument("--images", help="image root, if paths in the data are relative to it")
    data.add_argument("--limit", type=int, help="use at most this many examples")
    data.add_argument("--feature-cache", help="folder of cached image features")
    data.add_argument("--features-in-memory", action="store_true", default=None,
                      help="keep image features in memory instead of a disk cache")  # fmt: skip
    parts = sub.add_argument_group("pretrained parts (then only the prefix stage trains)")
    parts.add_argument("--encoder", help="open_clip model name, or local-dir:<folder>")
    parts.add_argument("--encoder-pretrained", help="open_clip pretrained tag or file")
    parts.add_argument("--lm", help="Hugging Face causal LM id or folder (frozen)")
    parts.add_argument("--mapper", choices=["mlp", "transformer"])
    parts.add_argument("--prefix-length", type=int)
    parts.add_argument("--mapper-layers", type=int)
    parts.add_argument("--mapper-input", choices=["embedding", "tokens"])
    parts.add_argument("--gradient-checkpointing", action="store_true", default=None)
    parts.add_argument("--push-to-hub", help="hub repo id to upload the final pipeline to")
    for name, kind in [
        ("seed", int), ("batch_size", int), ("lm_batch_size", int), ("prefix_batch_size", int),
        ("checkpoint_every", int),
        ("clip_steps", int), ("clip_lr", float), ("clip_examples", int),
        ("clip_caption_weight", float),
        ("lm_steps", int), ("lm_lr", float), ("lm_examples", int), ("lm_answer_weight", float),
        ("prefix_steps", int), ("prefix_lr", float), ("prefix_examples", int),
        ("prefix_epochs", float),
    ]:  # fmt: skip
        sub.add_argument("--" + name.replace("_", "-"), type=kind)

    sub = commands.add_parser("eval", help="evaluate a model")
    sub.set_defaults(func=cmd_eval)
    sub.add_argument("dataset", choices=["shapeworld", "captions", "zeroshot", "vqa"])
    sub.add_argument("--model", default=DEFAULT_MODEL)
    sub.add_argument("--json", action="store_true")
    sub.add_argument("--n", type=int, default=1000, help="shapeworld: scenes per measure")
    sub.add_argument("--seed", type=int, default=1234, help="shapeworld: scene seed")
    sub.add_argument("--split", help="shapeworld: train, held_out or any; Karpathy data: "
                     "its split (default test)")  # fmt: skip
    sub.add_argument("--data", help="captions/vqa: dataset file; zeroshot: labelled folder")
    sub.add_argument("--data-format", default="auto", choices=["auto", *FORMATS])
    sub.add_argument("--images", help="image root, if paths in the data are relative to it")
    sub.add_argument("--limit", type=int, help="evaluate on at most this many images")
    sub.add_argument("--batch-size", type=int, default=32)
    sub.add_argument("--num-beams", type=int, default=1)
    sub.add_argument("--out", help="write scores and every prediction here as JSON")

    args = parser.parse_args(argv)
    from .images import ImageError
    from .search import IndexLoadError

    try:
        args.func(args)
    except (ImageError, IndexLoadError, FileNotFoundError, ValueError) as error:
        raise SystemExit(f"error: {error}") from None
