"""Why the LM is frozen: the same prefix budget with the LM frozen (the method) against the LM
fine-tuned together with the mapper (ClipCap's other variant), on seen and held-out slices.

Both arms start from the same encoder and LM (a run folder's `encoder/` and `lm/`) and train
the prefix stage for the same steps on the same data:

    vlm train shapeworld --out runs/frozen --stages prefix --prefix-steps 1200
    vlm train shapeworld --out runs/tuned --stages prefix --prefix-steps 1200 --finetune-lm
    PYTHONPATH=. python experiments/frozen_vs_finetuned.py \
        runs/frozen/pipeline runs/tuned/pipeline --n 300
"""

from __future__ import annotations

import argparse

from vlm import Pipeline
from vlm.shapeworld.evaluation import evaluate_shapeworld

ROWS = ("caption_exact", "held_out_caption_exact", "held_out_caption_exact_1obj",
        "vqa_overall", "held_out_vqa_overall", "phrasing_vqa_overall")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("frozen", help="the pipeline trained with the LM frozen")
    parser.add_argument("finetuned", help="the pipeline trained with the LM fine-tuned")
    parser.add_argument("--n", type=int, default=300, help="scenes per slice")
    parser.add_argument("--seed", type=int, default=4321)
    args = parser.parse_args()
    scores = {}
    for name in ("frozen", "finetuned"):
        pipeline = Pipeline.from_pretrained(getattr(args, name), device="cpu")
        results = evaluate_shapeworld(pipeline, n=args.n, seed=args.seed,
                                      perturbations=("clean",), extras=False)  # fmt: skip
        scores[name] = {row: results[row]["clean"] for row in ROWS}
    print("| measure | LM frozen | LM fine-tuned |\n|---|---:|---:|")
    for row in ROWS:
        print(f"| {row} | {scores['frozen'][row]:.1%} | {scores['finetuned'][row]:.1%} |")


if __name__ == "__main__":
    main()
