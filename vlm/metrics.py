"""The standard scores: COCO caption metrics (pycocoevalcap), retrieval recall@k, VQA accuracy.

Caption metrics are computed exactly as the COCO caption evaluation does: both sides are
tokenised with the PTB tokenizer (Stanford CoreNLP, Java), then BLEU-1..4, METEOR (Java),
ROUGE-L and CIDEr, and SPICE when its Stanford models are installed. Without Java, text is
tokenised in Python the same way for plain captions (lower case, punctuation dropped) and the
Java-only metrics are left out and reported as such.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import torch

from .errors import InputError

# What PTBTokenizer removes from captions (pycocoevalcap's PUNCTUATIONS)
_PUNCTUATION = re.compile(r"""(''|'|``|`|-LRB-|-RRB-|-LCB-|-RCB-|[.?!,:\-@;"()\[\]{}])""")


def _python_tokenize(groups: dict[str, list[str]]) -> dict[str, list[str]]:
    """A stand-in for PTBTokenizer on plain captions (used only when Java is missing)."""
    clean = lambda text: " ".join(_PUNCTUATION.sub(" ", text.lower()).split())  # noqa: E731
    return {key: [clean(t) for t in texts] for key, texts in groups.items()}


def java_available() -> bool:
    return shutil.which("java") is not None


def spice_available() -> bool:
    """SPICE needs Java and the Stanford CoreNLP models, which it downloads on first use (not
    possible offline); it runs only when they are already installed."""
    import pycocoevalcap.spice as spice

    return (
        java_available()
        and (Path(spice.__file__).parent / "lib" / "stanford-corenlp-3.6.0.jar").is_file()
    )


def caption_scores(
    references: dict[str, list[str]], predictions: dict[str, str]
) -> tuple[dict[str, float], list[str]]:
    """Corpus-level COCO caption metrics of `predictions` (one caption per image id) against
    `references` (several per id). Returns (scores, notes on metrics left out)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    ids = [key for key in predictions if references.get(key)]
    if not ids:
        raise InputError("no prediction has a reference caption to compare with")
    refs = {key: list(references[key]) for key in ids}
    preds = {key: [predictions[key]] for key in ids}
    notes: list[str] = []
    if java_available():
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        tokenizer = PTBTokenizer()
        to_coco = lambda g: {k: [{"caption": t} for t in v] for k, v in g.items()}  # noqa: E731
        refs, preds = tokenizer.tokenize(to_coco(refs)), tokenizer.tokenize(to_coco(preds))
    else:
        refs, preds = _python_tokenize(refs), _python_tokenize(preds)
        notes.append("no Java: Python tokenisation instead of PTB; METEOR and SPICE left out")
    scorers = [(Bleu(4), ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4"]), (Rouge(), "ROUGE-L"),
               (Cider(), "CIDEr")]  # fmt: skip
    if java_available():
        from pycocoevalcap.meteor.meteor import Meteor

        scorers.insert(1, (Meteor(), "METEOR"))
    if spice_available():
        from pycocoevalcap.spice.spice import Spice

        scorers.append((Spice(), "SPICE"))
    elif java_available():
        notes.append("SPICE left out: its Stanford CoreNLP models are not installed")
    scores: dict[str, float] = {}
    for scorer, names in scorers:
        score, _ = scorer.compute_score(refs, preds)
        if isinstance(names, list):
            scores.update({n: float(s) for n, s in zip(names, score, strict=True)})
        else:
            scores[names] = float(score)
    return scores, notes


def recall_at_k(
    similarity: torch.Tensor, relevant: list[set[int]], ks: tuple[int, ...] = (1, 5, 10)
) -> dict[int, float]:
    """Recall@k for queries (rows of `similarity` [Q, N]): the share of queries with at least
    one relevant item (`relevant[q]`, indices into N) among their k best."""
    top = similarity.topk(min(max(ks), similarity.shape[1]), dim=1).indices.tolist()
    return {
        k: sum(bool(set(row[:k]) & rel) for row, rel in zip(top, relevant, strict=True))
        / len(relevant)
        for k in ks
    }


_ARTICLES = {"a", "an", "the"}
_NUMBERS = {
    w: str(i)
    for i, w in enumerate(
        ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
    )
}
_NUMBERS["none"] = "0"


def normalize_answer(text: str) -> str:
    """VQA-style answer normalisation: lower case, no punctuation or articles, number words
    as digits (so "Two." and "2" agree)."""
    words = re.sub(r"[^\w\s]", " ", text.lower()).split()
    return " ".join(_NUMBERS.get(w, w) for w in words if w not in _ARTICLES)
