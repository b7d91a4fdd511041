"""Video on the bundle's recipe (issue 43): the LM's text gains clip narratives (each second's
frame line, where every object is, then what happened), the prefix stage gains paired clips,
and the video tasks are measured against how many clips were paired (the curve: 0, a few
hundred, thousands).

Every arm keeps the bundle's encoder (the CLIP stage is unchanged) and trains the same LM
once (`<out>/lm`, reused by every arm): the bundle's LM stage with `narrative_share` of its
documents narratives and 256 positions (four 20-vector frames and a description need more
than 128), 16 blocks a step (the tokens of the bundle's 32 blocks of 128). Then each arm's
prefix stage (the bundle's, `clip_batch_share` of its batches clips where it has any), and
`evaluate_video` on fresh clips and the image captions and answers on fresh scenes (seed 777:
a development seed, not the evaluation's 1234), since clips must not cost the images.
The LM alone is measured too: given a narrative's frame lines as text, does it write what
happened?

    PYTHONPATH=. python experiments/video_recipe.py --out runs/video --clips 0,300,4000

Results: docs/video-lab.md.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from transformers import AutoModelForCausalLM, AutoTokenizer

from vlm.encoder import Encoder
from vlm.paths import ASSETS
from vlm.prompts import TRACKS_PROMPT, VIDEO_PROMPT
from vlm.shapeworld.clips import (
    clip_narrative,
    clip_tracks,
    describe_clip,
    describe_frame,
    render_clip,
    sample_clip,
)
from vlm.shapeworld.evaluation import VIDEO_SLICES, evaluate_shapeworld, evaluate_video
from vlm.shapeworld.recipe import ShapeWorld
from vlm.training import TrainConfig
from vlm.training.prefix import train_prefix
from vlm.training.stages import train_lm
from vlm.video import DESCRIPTION_TOKENS, TRACK_TOKENS

ENCODER = ASSETS / "shapeworld" / "encoder"
PREFIX_IMAGES = 60_000  # the bundle's prefix stage: TrainConfig.prefix_examples


def lm_stage(out: Path, args) -> Path:
    """The LM with narratives in its text (trained once, reused)."""
    folder = out / "lm"
    if (folder / "done").is_file():
        return folder
    data = ShapeWorld(narrative_share=args.narrative_share)
    config = TrainConfig(out=out, seed=args.seed, lm_positions=args.lm_positions,
                         lm_batch_size=args.lm_batch_size, lm_steps=args.lm_steps)  # fmt: skip
    lm, tokenizer = train_lm(data, config, Accelerator(cpu=not torch.cuda.is_available()))
    lm.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "done").touch()
    return folder


def text_only(lm_dir: Path, n: int, seed: int) -> dict[str, float]:
    """The LM alone: each fresh clip's frame lines as text, then "Tracks:", what it writes
    there, then "What happened:" (as the pipeline reads frame lines); the share it writes
    each clip's tracks and description exactly, by slice."""
    lm = AutoModelForCausalLM.from_pretrained(lm_dir)
    tokenizer = AutoTokenizer.from_pretrained(lm_dir)

    def written(prompt: str, most: int) -> str:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        most = min(most, lm.config.n_positions - ids.shape[1])  # no room: written cut short
        if most < 1:
            return ""
        out = lm.generate(ids, max_new_tokens=most, do_sample=False,
                          pad_token_id=tokenizer.eos_token_id)  # fmt: skip
        return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).split("\n")[0]

    rng = random.Random(f"text-only-{seed}")
    scores = {}
    for prefix, split in VIDEO_SLICES.items():
        right = tracks_right = 0
        for _ in range(n):
            clip = sample_clip(rng, split)
            text = clip_narrative(clip)
            lines = text[: text.index(TRACKS_PROMPT) + len(TRACKS_PROMPT)]
            tracks = written(lines, TRACK_TOKENS).strip()
            tracks_right += tracks == clip_tracks(clip)
            happened = written(f"{lines} {tracks}\n{VIDEO_PROMPT}", DESCRIPTION_TOKENS)
            right += happened.strip() == describe_clip(clip)
        scores[f"{prefix}text_only_description_exact"] = right / n
        scores[f"{prefix}text_only_tracks_exact"] = tracks_right / n
    return scores


def frame_line_scores(pipeline, n: int, seed: int) -> dict[str, float]:
    """Each frame line the model writes (`Pipeline.frame_lines`, a frame a second of fresh
    clips) against the true one (`describe_frame`): the share exactly right, and the share of
    clips whose lines are all right."""
    rng = random.Random(f"frame-lines-{seed}")
    frames_right, clips_right, frames_seen = 0, 0, 0
    for _ in range(n):
        clip = sample_clip(rng, "train")
        picked = list(range(0, clip.frames, round(clip.fps)))
        frames = render_clip(clip)
        lines = pipeline.frame_lines([frames[i] for i in picked], [i / clip.fps for i in picked])
        truth = [describe_frame(clip.scene(i)) for i in picked]
        right = [line == true for line, true in zip(lines, truth, strict=True)]
        frames_right, frames_seen = frames_right + sum(right), frames_seen + len(right)
        clips_right += all(right)
    return {"frame_line_exact": frames_right / frames_seen,
            "frame_lines_all_exact": clips_right / n}  # fmt: skip


def arm(clips: int, lm_dir: Path, out: Path, args) -> dict[str, float]:
    """One prefix stage with `clips` paired clips, measured."""
    data = ShapeWorld(narrative_share=args.narrative_share,
                      clips_per_image=clips / PREFIX_IMAGES,
                      frame_line_share=args.frame_line_share)  # fmt: skip
    config = TrainConfig(out=out / f"clips-{clips}", seed=args.seed, stages=("prefix",),
                         prefix_steps=args.prefix_steps, checkpoint_every=10**9,
                         prefix_text_teacher=data.prefix_text_teacher)  # fmt: skip
    config.out.mkdir(parents=True, exist_ok=True)
    encoder = Encoder.load({"model": f"local-dir:{ENCODER.resolve()}"})
    lm = AutoModelForCausalLM.from_pretrained(lm_dir, dtype=torch.float32).requires_grad_(False)
    tic = time.time()
    pipeline = train_prefix(data, encoder, lm, AutoTokenizer.from_pretrained(lm_dir), config,
                            Accelerator(cpu=not torch.cuda.is_available()))  # fmt: skip
    seconds = time.time() - tic
    pipeline.save_pretrained(out / f"clips-{clips}" / "pipeline")
    results = evaluate_video(pipeline, n=args.n, seed=777, perturbations=("clean",))
    images = evaluate_shapeworld(pipeline, n=args.image_n, seed=777, perturbations=("clean",),
                                 extras=False)  # fmt: skip
    images = {f"image_{k}": v for k, v in images.items() if k.endswith(("exact", "overall"))}
    lines = frame_line_scores(pipeline, args.n, 777) if args.frame_line_share else {}
    return (
        {k: v["clean"] for k, v in (results | images).items()} | lines | {"prefix_seconds": seconds}
    )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/video"))
    parser.add_argument("--clips", default="0,300,4000",
                        help='paired clips, one arm each ("": the LM alone)')  # fmt: skip
    parser.add_argument("--narrative-share", type=float, default=0.15)
    parser.add_argument("--lm-steps", type=int, default=4500)
    parser.add_argument("--lm-positions", type=int, default=256)
    parser.add_argument("--lm-batch-size", type=int, default=16, help="blocks of positions")
    parser.add_argument("--prefix-steps", type=int, default=6000)
    parser.add_argument("--frame-line-share", type=float, default=0.0,
                        help="the share of an image's texts that are frame lines")  # fmt: skip
    parser.add_argument("--n", type=int, default=60, help="fresh clips a slice")
    parser.add_argument("--image-n", type=int, default=300,
                        help="fresh scenes a slice for the image captions and answers")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    lm_dir = lm_stage(args.out, args)
    results = {"text_only": text_only(lm_dir, args.n, 777)}
    print(json.dumps(results["text_only"]), flush=True)
    for clips in (int(c) for c in args.clips.split(",") if c.strip()):
        done = args.out / f"clips-{clips}" / "row.json"
        if done.is_file():  # measured before at this out folder
            results[str(clips)] = json.loads(done.read_text())
        else:
            results[str(clips)] = arm(clips, lm_dir, args.out, args)
            done.write_text(json.dumps(results[str(clips)], indent=2))
        print(clips, json.dumps(results[str(clips)]), flush=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
