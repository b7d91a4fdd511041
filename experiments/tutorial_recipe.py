"""The tutorial's own recipe beside ours: four ways to learn the image embedding the mapper
reads, each followed by the same prefix stage into the same frozen LM (issue 46).

- `autoencoder`: the image embedding is the bottleneck of an autoencoder trained to rebuild
  the image with mean-squared error (tutorial §3.1, §4.1). The encoder half is the bundle's
  ViT (so that only the objective differs, and the mapper reads the same tokens); the decoder
  is convolutional (transposed convolutions from the embedding to the 64 × 64 image).
- `word_embedding`: zero-shot learning as the tutorial gives it (§3.2, §4.2, DeViSE's hinge
  rank loss): the image embedding, through a linear map, is pulled towards the word
  embeddings of its scene's attribute words (the frozen LM's own input embeddings of
  "large", "red", "circle", ...: embeddings learnt from text alone) and away from the other
  scenes' of the batch by a margin. Zero-shot labels and text → image search then go
  through those word embeddings.
- `clip`: the bundle's contrastive CLIP stage without its caption head.
- `clip_coca`: the bundle's recipe: contrastive CLIP with the CoCa caption head.

Every arm trains the same ViT (MODEL_SIZES[size]["clip"]) for the same steps and batch on the
same rendered scenes (`ShapeWorld.clip_data`: no HELD_OUT combination in any image), then
the prefix stage (`vlm.training.train`, stages=("prefix",)) with the bundled frozen LM and
the size's mapper. Measured on fresh scenes (`evaluate_shapeworld`'s seeds, never trained
on): captions and answers on seen and held-out combinations, zero-shot labels, text → image
R@5, explain's peak, linear probes of the embedding (shape, colour, size, position of one
object), the encoder stage's time; and reconstructions of a few scenes by the autoencoder.

    PYTHONPATH=. python experiments/tutorial_recipe.py --out runs/tutorial \\
        --encoder-steps 2000 --prefix-steps 6000 --n 300

An arm measured is kept (`<out>/<arm>/row.json`, with its budget): a rerun with the same
budget reads it instead of training again, so the full budget can be run in sittings.

Results: docs/tutorial-recipe.md.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from PIL import Image
from transformers import AutoModelForCausalLM, AutoTokenizer

from vlm import Pipeline
from vlm import shapeworld as sw
from vlm.encoder import Encoder
from vlm.factory import build_encoder
from vlm.paths import ASSETS
from vlm.shapeworld.evaluation import evaluate_shapeworld
from vlm.shapeworld.recipe import ShapeWorld
from vlm.training import MODEL_SIZES, Stage, TrainConfig, run_stage, train
from vlm.training.prefix import train_prefix as prefix_stage

ARMS = ("autoencoder", "word_embedding", "clip", "clip_coca")
LM = ASSETS / "shapeworld" / "lm"
MARGIN = 0.1  # DeViSE's hinge margin, on cosine similarities
COLUMNS = {  # table column -> measure of evaluate_shapeworld (or of this script)
    "captions seen": "caption_exact",
    "captions held-out": "held_out_caption_exact",
    "answers seen": "vqa_overall",
    "answers held-out": "held_out_vqa_overall",
    "zero-shot seen": "zeroshot_train",
    "zero-shot held-out": "zeroshot_held_out",
    "text→image R@5": "retrieval_r5",
    "explain peak": "explain_peak_all",
    "probe shape": "probe_shape",
    "probe colour": "probe_color",
    "probe size": "probe_size",
    "probe position": "probe_position",
    "encoder stage (s)": "encoder_seconds",
    "encoder step (s)": "encoder_step_seconds",
}


# ---------------------------------------------------------------------------- the encoders


class Decoder(torch.nn.Module):
    """The autoencoder's other half: an embedding back to a `side` × `side` image (in the
    encoder's normalised pixel space), through transposed convolutions from 4 × 4, halving
    the channels at each doubling (light: 8 channels at 64 × 64, so that a step costs about
    what a CLIP step does on a CPU)."""

    def __init__(self, dim: int, side: int):
        super().__init__()
        ups = int(np.log2(side // 4))
        widths = [min(128, 8 * 2 ** (ups - i)) for i in range(ups + 1)]  # 128 … 8 channels
        self.start = torch.nn.Linear(dim, widths[0] * 16)
        layers: list[torch.nn.Module] = []
        for a, b in zip(widths, widths[1:], strict=False):
            layers += [torch.nn.ConvTranspose2d(a, b, 4, 2, 1), torch.nn.GELU()]
        self.body = torch.nn.Sequential(*layers, torch.nn.Conv2d(widths[-1], 3, 3, padding=1))
        self.width = widths[0]

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        return self.body(self.start(embedding).view(len(embedding), self.width, 4, 4))


def word_vectors(words: list[str]) -> dict[str, torch.Tensor]:
    """The frozen LM's input embedding of each word as it follows a space (the mean of its
    tokens' where it takes several)."""
    lm = AutoModelForCausalLM.from_pretrained(LM)
    tokenizer = AutoTokenizer.from_pretrained(LM)
    table = lm.get_input_embeddings().weight.detach().float()
    vectors = {}
    for word in words:
        ids = tokenizer(" " + word, add_special_tokens=False)["input_ids"]
        vectors[word] = table[ids].mean(0)
    return vectors


WORLD_WORDS = [*sw.SIZES, *sw.COLORS, *sw.SHAPES]


def scene_target(text: str, vectors: dict[str, torch.Tensor]) -> torch.Tensor:
    """A caption's class embedding: the normalised mean of its attribute words' vectors."""
    words = [w for w in text.replace(",", " ").split() if w in vectors]
    return F.normalize(torch.stack([vectors[w] for w in words]).mean(0), dim=0)


def hinge_rank_loss(vectors: torch.Tensor, targets: torch.Tensor, margin: float = MARGIN):
    """DeViSE's loss: each image's vector (normalised) must be nearer its own scene's target
    than every other target of the batch by `margin`, in cosine similarity."""
    scores = F.normalize(vectors, dim=-1) @ targets.T  # [B, B]
    hinge = (margin - scores.diagonal()[:, None] + scores).clamp(min=0)
    hinge = hinge * (1 - torch.eye(len(scores), device=scores.device))
    return hinge.sum(1).mean()


def train_encoder(arm: str, out: Path, args) -> tuple[Path, float]:
    """The arm's encoder stage: its encoder saved in `out/encoder` (an open_clip folder), and
    how long the stage took."""
    folder = out / "encoder"
    out.mkdir(parents=True, exist_ok=True)
    tic = time.time()
    if arm in ("clip", "clip_coca"):  # the trainer's own CLIP stage
        config = TrainConfig(out=out, size=args.size, stages=("clip",), seed=args.seed,
                             clip_steps=args.encoder_steps, clip_examples=args.examples,
                             batch_size=args.batch_size,
                             clip_caption_weight=4.0 if arm == "clip_coca" else 0.0)  # fmt: skip
        train(config)
        return folder, time.time() - tic
    encoder = build_encoder(MODEL_SIZES[args.size]["clip"])
    data = ShapeWorld().clip_data(args.examples, args.seed)
    side = encoder.model.visual.image_size
    side = side[0] if isinstance(side, tuple | list) else side
    dim = encoder.model.visual.output_dim
    modules = {"clip": encoder.model.requires_grad_(True)}
    if arm == "autoencoder":
        modules["decoder"] = Decoder(dim, side)
    else:
        vectors = word_vectors(WORLD_WORDS)
        modules["project"] = torch.nn.Linear(dim, len(next(iter(vectors.values()))))
    module = torch.nn.ModuleDict(modules)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())

    def batches(start: int):
        rng = random.Random(f"{arm}-{args.seed}-{start}")
        while True:
            items = [data[rng.randrange(len(data))] for _ in range(args.batch_size)]
            pixels = encoder.pixels([image for image, _ in items]).to(accelerator.device)
            if arm == "autoencoder":
                yield pixels, None
            else:
                targets = torch.stack([scene_target(texts[0], vectors) for _, texts in items])
                yield pixels, targets.to(accelerator.device)

    def loss(model, batch):
        pixels, targets = batch
        pooled, _ = encoder.pooled_and_patches(pixels, mixed=False, project=False)
        if arm == "autoencoder":
            return F.mse_loss(model["decoder"](pooled), pixels)
        return hinge_rank_loss(model["project"](pooled), targets)

    config = TrainConfig(out=out, seed=args.seed, checkpoint_every=10**9)
    stage = Stage(arm, module, loss, batches, args.encoder_steps, 2e-3, args.batch_size)
    module = run_stage(stage, config, accelerator)
    encoder.model = module["clip"].requires_grad_(False)
    encoder.save(folder)
    extra = {k: v for k, v in module.items() if k != "clip"}
    torch.save({k: v.state_dict() for k, v in extra.items()}, out / "extra.pt")
    return folder, time.time() - tic


def train_prefix(folder: Path, out: Path, args) -> Pipeline:
    """The same prefix stage for every arm, the bundle's recipe (its mapper, text teacher and
    context rows): its encoder, the bundled frozen LM. (No familiarity profile nor
    calibration is fitted: nothing measured here reads them.)"""
    dataset = ShapeWorld()
    config = TrainConfig(out=out, size=args.size, stages=("prefix",), seed=args.seed,
                         mapper=MODEL_SIZES[args.size]["mapper"], prefix_steps=args.prefix_steps,
                         prefix_examples=args.examples,
                         prefix_text_teacher=dataset.prefix_text_teacher)  # fmt: skip
    encoder = Encoder.load({"model": f"local-dir:{folder.resolve()}"})
    lm = AutoModelForCausalLM.from_pretrained(LM, dtype=torch.float32).requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(LM)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    return prefix_stage(dataset, encoder, lm, tokenizer, config, accelerator)


# ---------------------------------------------------------------------------- measures


def embeddings(pipeline: Pipeline, images: list[Image.Image]) -> torch.Tensor:
    pixels = pipeline.encoder.pixels(images)
    with torch.no_grad():
        pooled, _ = pipeline.encoder.pooled_and_patches(pixels, mixed=False, project=False)
    return pooled


def probes(pipeline: Pipeline, n: int, seed: int) -> dict[str, float]:
    """Linear probes of the embedding on one-object scenes (trained on `2n` fresh scenes,
    tested on `n` others): shape, colour, size, and the object's horizontal third."""
    rng = random.Random(f"probe-{seed}")
    scenes = [sw.sample_scene(rng, 1, split="train") for _ in range(3 * n)]
    features = embeddings(pipeline, [sw.render(s) for s in scenes])
    features = (features - features.mean(0)) / (features.std(0) + 1e-6)
    labels = {
        "shape": [sw.SHAPES.index(s.objects[0].shape) for s in scenes],
        "color": [list(sw.COLORS).index(s.objects[0].color) for s in scenes],
        "size": [sw.SIZES.index(s.objects[0].size) for s in scenes],
        "position": [min(2, int(s.objects[0].x * 3)) for s in scenes],
    }
    scores = {}
    for name, values in labels.items():
        y = torch.tensor(values)
        train_x, train_y, test_x, test_y = (
            features[: 2 * n],
            y[: 2 * n],
            features[2 * n :],
            y[2 * n :],
        )
        probe = torch.nn.Linear(features.shape[1], int(y.max()) + 1)
        optimizer = torch.optim.LBFGS(probe.parameters(), max_iter=200)

        def closure(probe=probe, optimizer=optimizer, x=train_x, y=train_y):
            optimizer.zero_grad()
            loss = F.cross_entropy(probe(x), y) + 1e-3 * probe.weight.pow(2).sum()
            loss.backward()
            return loss

        optimizer.step(closure)
        with torch.no_grad():
            scores[f"probe_{name}"] = float((probe(test_x).argmax(1) == test_y).float().mean())
    return scores


def word_embedding_scores(pipeline: Pipeline, out: Path, n: int, seed: int) -> dict[str, float]:
    """Zero-shot labels and text → image R@5 through the word embeddings (the tutorial's
    zero-shot), on the same kind of fresh scenes as `evaluate_shapeworld`'s."""
    vectors = word_vectors(WORLD_WORDS)
    dim = pipeline.encoder.model.visual.output_dim
    project = torch.nn.Linear(dim, len(next(iter(vectors.values()))))
    project.load_state_dict(torch.load(out / "extra.pt")["project"])

    def embed(images):
        with torch.no_grad():
            return F.normalize(project(embeddings(pipeline, images)), dim=-1)

    rng = random.Random(f"word-zero-shot-{seed}")
    labels = sw.labels()
    label_targets = torch.stack([scene_target(label, vectors) for label in labels])
    scores = {}
    for split, name in (("train", "zeroshot_train"), ("held_out", "zeroshot_held_out")):
        scenes = [sw.sample_scene(rng, 1, split=split) for _ in range(max(1, n // 2))]
        best = (embed([sw.render(s) for s in scenes]) @ label_targets.T).argmax(1).tolist()
        scores[name] = float(np.mean([labels[b] == s.objects[0].name
                                      for b, s in zip(best, scenes, strict=True)]))  # fmt: skip
    scenes = [sw.sample_scene(rng, split="train") for _ in range(n)]
    gallery = embed([sw.render(s) for s in scenes])
    hits = []
    for query in sorted({sw.describe(s) for s in scenes}):
        top = (gallery @ scene_target(query, vectors)).topk(min(5, len(scenes))).indices
        hits.append(any(sw.describe(scenes[i]) == query for i in top.tolist()))
    scores["retrieval_r5"] = float(np.mean(hits))
    return scores


def reconstructions(pipeline: Pipeline, out: Path, path: Path, count: int = 6) -> None:
    """Scenes (top) and the autoencoder's rebuilding of them (bottom), as one PNG."""
    dim = pipeline.encoder.model.visual.output_dim
    side = pipeline.encoder.pixels([sw.render(sw.sample_scene(random.Random(0)))]).shape[-1]
    decoder = Decoder(dim, side)
    decoder.load_state_dict(torch.load(out / "extra.pt")["decoder"])
    rng = random.Random("reconstructions")
    scenes = [sw.sample_scene(rng, 1 + i % 3, split="train") for i in range(count)]
    pixels = pipeline.encoder.pixels([sw.render(s) for s in scenes])
    with torch.no_grad():
        rebuilt = decoder(embeddings(pipeline, [sw.render(s) for s in scenes]))
    mean = torch.tensor(pipeline.encoder.preprocess.transforms[-1].mean)[:, None, None]
    std = torch.tensor(pipeline.encoder.preprocess.transforms[-1].std)[:, None, None]
    rows = [torch.cat(list(batch * std + mean), dim=2) for batch in (pixels, rebuilt)]
    grid = (torch.cat(rows, dim=1).clamp(0, 1).permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    image = Image.fromarray(grid)
    image.resize((image.width * 2, image.height * 2), Image.Resampling.NEAREST).save(path)


def encoder_pace(out: Path, arm: str) -> float | None:
    """Seconds an encoder step takes: the median over the stage's logged 10-step windows of
    its last run (`out/log.jsonl`), which a pause or a burst of other work on the machine
    moves less than the stage's wall time."""
    stage = "clip" if arm in ("clip", "clip_coca") else arm
    log = out / "log.jsonl"
    if not log.is_file():
        return None
    records = [r for r in map(json.loads, log.read_text().splitlines())
               if r.get("stage") == stage and "seconds" in r]  # fmt: skip
    starts = [i for i, r in enumerate(records) if r["step"] == 0]
    records = records[starts[-1] :] if starts else records
    pairs = zip(records, records[1:], strict=False)
    paces = [(b["seconds"] - a["seconds"]) / (b["step"] - a["step"])
             for a, b in pairs if b["step"] > a["step"]]  # fmt: skip
    return float(np.median(paces)) if paces else None


def measure(arm: str, pipeline: Pipeline, out: Path, seconds: float, args) -> dict:
    text_tower = arm in ("clip", "clip_coca")
    results = evaluate_shapeworld(pipeline, n=args.n, perturbations=("clean",),
                                  extras=text_tower)  # fmt: skip
    scores = {measure: by_kind["clean"] for measure, by_kind in results.items()}
    if arm == "word_embedding":
        scores |= word_embedding_scores(pipeline, out, args.n, 1234)
    scores |= probes(pipeline, max(50, args.n), 1234)
    scores["encoder_seconds"] = seconds
    scores["encoder_step_seconds"] = encoder_pace(out, arm)
    return {column: scores.get(key) for column, key in COLUMNS.items()}


def table(rows: dict[str, dict]) -> str:
    """The results as a markdown table (– where a measure does not apply)."""
    lines = ["| embedding | " + " | ".join(COLUMNS) + " |",
             "|---|" + "---:|" * len(COLUMNS)]  # fmt: skip
    for arm, row in rows.items():
        cells = []
        for column in COLUMNS:
            value = row.get(column)
            if value is None:
                cells.append("–")
            elif column == "encoder step (s)":
                cells.append(f"{value:.2f}")
            elif column.endswith("(s)"):
                cells.append(f"{value:.0f}")
            else:
                cells.append(f"{100 * value:.1f}%")
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/tutorial"))
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--size", default="small", choices=sorted(MODEL_SIZES))
    parser.add_argument("--encoder-steps", type=int, default=2000)
    parser.add_argument("--prefix-steps", type=int, default=6000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--examples", type=int, default=80_000)
    parser.add_argument("--n", type=int, default=300, help="fresh scenes per slice")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reconstructions", type=Path, default=None,
                        help="where to save the autoencoder's reconstructions (PNG)")  # fmt: skip
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    rows = {}
    budget = {k: getattr(args, k) for k in ("size", "encoder_steps", "prefix_steps",
                                            "batch_size", "examples", "n", "seed")}  # fmt: skip
    for arm in args.arms.split(","):
        out = args.out / arm
        done = out / "row.json"  # an arm measured at this budget is not rerun
        if done.is_file() and json.loads(done.read_text())["budget"] == budget:
            row = json.loads(done.read_text())["row"]  # a column added since: from the log
            rows[arm] = {column: row.get(column) for column in COLUMNS}
            rows[arm]["encoder step (s)"] = row.get("encoder step (s)") or encoder_pace(out, arm)
            print(json.dumps({arm: rows[arm]}), "(measured before)", flush=True)
            continue
        folder, seconds = train_encoder(arm, out, args)
        pipeline = train_prefix(folder, out, args)
        rows[arm] = measure(arm, pipeline, out, seconds, args)
        if arm == "autoencoder":
            reconstructions(pipeline, out, args.reconstructions or out / "reconstructions.png")
        done.write_text(json.dumps({"budget": budget, "row": rows[arm]}, indent=2))
        print(json.dumps({arm: rows[arm]}), flush=True)
    (args.out / "results.json").write_text(json.dumps(rows, indent=2))
    print(table(rows))
    return rows


if __name__ == "__main__":
    main()
