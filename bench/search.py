"""search: query latency over N normalised 512-d vectors, exact vs approximate.

The indexes are `vlm.search.SearchIndex`'s own, made from its FAISS `factory` strings:
"Flat" (exact inner product, the reference) and the approximate kinds "IVF{nlist},Flat"
(nprobe tuned) and, outside quick mode, "HNSW32" (efSearch tuned). Vectors go in through
`SearchIndex._add_vectors`; queries go straight to the FAISS index (`SearchIndex.search`
would first run the text encoder). Latency is per single query (batch 1), p50 and p99 in
ms; recall@10 is the approximate top 10's overlap with the exact top 10.

The vectors are random but not uniform: uniform points on a 512-d sphere have no
neighbourhoods at all (every vector is about equally far from every other), unlike image
embeddings, and no approximate index helps. Each point is one of 1,000 random unit centres
plus isotropic noise of 1.4 times its norm, then normalised; queries are drawn the same way.
A query's 10th neighbour is then at cosine ~0.4 and barely closer than its 100th, which
makes this harder than real CLIP embeddings (10th neighbour ~0.8). The search parameter is
tuned on one query set and measured on another.
"""

from __future__ import annotations

import time
import types

import faiss
import numpy as np

from vlm.search import SearchIndex

from .common import SEED, Context, Metric, ratio_metric

DIM = 512
CLUSTERS = 1000
NOISE = 1.4  # norm of the noise relative to the centre's
TARGET_MS = 20.0  # p50 at 1M vectors
TARGET_RECALL = 0.95
NPROBES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
EF_SEARCHES = (16, 32, 64, 128, 256, 512, 1024)


def clustered_vectors(n: int, rng: np.random.Generator, centres: np.ndarray) -> np.ndarray:
    """n unit vectors: a random centre each, plus noise of NOISE times its norm."""
    dim = centres.shape[1]
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 65_536):
        m = min(65_536, n - start)
        noise = rng.standard_normal((m, dim), dtype=np.float32) * np.float32(NOISE / dim**0.5)
        chunk = centres[rng.integers(0, len(centres), m)] + noise
        faiss.normalize_L2(chunk)
        out[start : start + m] = chunk
    return out


def latencies_ms(index, queries: np.ndarray, k: int = 10) -> np.ndarray:
    times = []
    for q in queries:
        start = time.perf_counter()
        index.search(q[None], k)
        times.append((time.perf_counter() - start) * 1000)
    return np.array(times)


def recall_at_k(found: np.ndarray, exact: np.ndarray) -> float:
    k = exact.shape[1]
    return float(np.mean([len(set(f) & set(e)) / k for f, e in zip(found, exact, strict=True)]))


def tune(index, set_param, values, queries, exact) -> tuple[int, float, float]:
    """The smallest parameter value whose recall@10 reaches the target (else the largest).
    Returns it, its recall on the tuning queries, and the recall at FAISS's default."""
    default = recall_at_k(index.search(queries, 10)[1], exact)
    recall = 0.0
    for value in values:
        set_param(index, value)
        recall = recall_at_k(index.search(queries, 10)[1], exact)
        if recall >= TARGET_RECALL:
            break
    return value, recall, default


def library_index(factory: str, vectors: np.ndarray, train: np.ndarray | None = None):
    """A SearchIndex made from a factory string, holding `vectors` (no encoder needed), and
    the seconds it took to train and fill."""
    library = SearchIndex(types.SimpleNamespace(embed_dim=vectors.shape[1]), factory=factory)
    start = time.perf_counter()
    if train is not None:  # on a sample: add() would train on its first batch only
        library.index.train(train)
    library._add_vectors(vectors)
    return library.index, time.perf_counter() - start


def run_size(n: int, ctx: Context, rng: np.random.Generator) -> tuple[list[Metric], dict]:
    centres = rng.standard_normal((CLUSTERS, DIM), dtype=np.float32)
    faiss.normalize_L2(centres)
    data = clustered_vectors(n, rng, centres)
    tuning = clustered_vectors(ctx.sizes.search_queries, rng, centres)
    queries = clustered_vectors(ctx.sizes.search_queries, rng, centres)
    label = f"{n // 1000}k" if n < 1_000_000 else f"{n // 1_000_000}M"

    flat, _ = library_index("Flat", data)
    exact_tuning = flat.search(tuning, 10)[1]
    exact = flat.search(queries, 10)[1]
    flat_ms = latencies_ms(flat, queries)
    del flat

    nlist = 1 << int(np.log2(np.sqrt(n)))  # ~sqrt(n): 256 at 100k, 512 at 1M
    kinds = {f"IVF{nlist},Flat": lambda index, v: setattr(index, "nprobe", v)}
    if ctx.sizes.hnsw:
        kinds["HNSW32"] = lambda index, v: setattr(index.hnsw, "efSearch", v)
    metrics, details = [], {"flat_p50_ms": float(np.percentile(flat_ms, 50))}
    for factory, set_param in kinds.items():
        if factory.startswith("IVF"):
            sample = data[rng.choice(n, min(n, 64 * nlist), replace=False)]
            index, build_s = library_index(factory, data, train=sample)
            values = [v for v in NPROBES if v <= nlist]
        else:
            index, build_s = library_index(factory, data)
            values = EF_SEARCHES
        value, tuned_recall, default_recall = tune(index, set_param, values, tuning, exact_tuning)
        recall = recall_at_k(index.search(queries, 10)[1], exact)
        ms = latencies_ms(index, queries)
        del index
        name = f"{label} {factory.split(',')[0]}"
        param = "nprobe" if factory.startswith("IVF") else "efSearch"
        p50, p99 = (float(np.percentile(ms, q)) for q in (50, 99))
        flat50, flat99 = (float(np.percentile(flat_ms, q)) for q in (50, 99))
        at_scale = n >= 1_000_000
        metrics += [
            Metric(
                f"{name} {param}={value} p50 (ms)", p50, flat50, "ms", flat50 / p50,
                "speed-up: flat / approx",
                f"< {TARGET_MS:g} ms" if at_scale else "", (p50 < TARGET_MS) if at_scale else None,
            ),
            ratio_metric(f"{name} p99 (ms)", p99, flat99, "ms", flat99 / p99,
                         "speed-up: flat / approx"),
            ratio_metric(f"{name} recall@10", recall, 1.0, "", recall,
                         "recall vs exact flat", (">=", TARGET_RECALL)),
        ]  # fmt: skip
        details[factory] = {
            param: value,
            "build_s": build_s,
            "tuning_recall": tuned_recall,
            f"recall_at_faiss_default_{param}": default_recall,
        }
    return metrics, details


def run(ctx: Context) -> dict:
    rng = np.random.default_rng(SEED)
    metrics = []
    details = {"dim": DIM, "clusters": CLUSTERS, "noise": NOISE,
               "faiss_threads": faiss.omp_get_max_threads()}  # fmt: skip
    for n in ctx.sizes.search_sizes:
        size_metrics, details[str(n)] = run_size(n, ctx, rng)
        metrics += size_metrics
    return {"metrics": metrics, "details": details}
