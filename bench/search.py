"""search: query latency over N normalised 512-d vectors, exact vs approximate.

The indexes are `vlm.search.SearchIndex`'s own, made from its FAISS `factory` strings and
filled through `SearchIndex._add_vectors`, which trains an approximate index on everything
added (FAISS's k-means samples 256 vectors per list of that): "Flat" (exact inner product,
the reference) and the approximate kinds "IVF{nlist},Flat" with nlist ~ sqrt(N) and, for
databases up to `Sizes.hnsw_up_to`, "HNSW32". Their search parameter (nprobe, efSearch) is
set as a `search_params` string, the way SearchIndex applies it, and tuned on one query set:
the smallest value whose recall@10 reaches TUNE_RECALL (the target plus a margin, so that it
holds on queries it was not tuned on); then it is measured on another query set. Queries go
straight to the FAISS index (`SearchIndex.search` would first run the text encoder).
Latency is per single query (batch 1), p50 and p99 in ms; recall@10 is the approximate top
10's overlap with the exact top 10. The exact index's latency is a full scan whatever the
query, so it is timed on the first FLAT_TIMED queries only (at 1M, a scan takes ~1 s).

The vectors are random but not uniform: uniform points on a 512-d sphere have no
neighbourhoods at all (every vector is about equally far from every other), unlike image
embeddings, and no approximate index helps. Each point is one of 1,000 random unit centres
plus isotropic noise of 1.4 times its norm, then normalised; queries are drawn the same way.
A query's 10th neighbour is then at cosine ~0.4 and barely closer than its 100th, which
makes this harder than real CLIP embeddings (10th neighbour ~0.8) for ranking, but easy for
IVF: the neighbours all share the query's centre, and k-means recovers the centres, so a
few lists hold them. The details therefore also give the p50 at each larger nprobe, up to
the first over the 1M target: the probes the time budget leaves for less clustered data.
HNSW32 is not built at 1M: on 2 busy shared cores its build took 24 minutes (at 100k, 14 s
to 2.5 min, by load), and on these well separated clusters it reached recall@10 0.90 at
efSearch=1024, where IVF reaches 1.0 at nprobe=1.
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
TUNE_RECALL = 0.97  # tuned to this on the tuning queries, so that TARGET_RECALL holds on others
FLAT_TIMED = 50
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


def tune(library: SearchIndex, param: str, values, queries, exact) -> tuple[int, float, float]:
    """The smallest parameter value whose recall@10 reaches TUNE_RECALL (else the largest),
    set on `library` as SearchIndex's `search_params`. Returns it, its recall on the tuning
    queries, and the recall at FAISS's default."""
    default = recall_at_k(library.index.search(queries, 10)[1], exact)
    recall = 0.0
    for value in values:
        set_param(library, param, value)
        recall = recall_at_k(library.index.search(queries, 10)[1], exact)
        if recall >= TUNE_RECALL:
            break
    return value, recall, default


def set_param(library: SearchIndex, param: str, value: int) -> None:
    library.search_params = f"{param}={value}"
    library._apply_search_params()


def budget(library: SearchIndex, param: str, values, queries) -> dict[int, float]:
    """p50 ms at each value from the tuned one up, stopping after the first over TARGET_MS."""
    p50s = {}
    for value in values:
        set_param(library, param, value)
        p50s[value] = float(np.percentile(latencies_ms(library.index, queries), 50))
        if p50s[value] > TARGET_MS:
            break
    return p50s


def library_index(factory: str, vectors: np.ndarray) -> tuple[SearchIndex, float]:
    """A SearchIndex made from a factory string, holding `vectors` (no encoder needed), and
    the seconds it took to train and fill, as SearchIndex.add does after encoding."""
    library = SearchIndex(types.SimpleNamespace(embed_dim=vectors.shape[1]), factory=factory)
    start = time.perf_counter()
    library._add_vectors(vectors)
    return library, time.perf_counter() - start


def run_size(n: int, ctx: Context, rng: np.random.Generator) -> tuple[list[Metric], dict]:
    centres = rng.standard_normal((CLUSTERS, DIM), dtype=np.float32)
    faiss.normalize_L2(centres)
    data = clustered_vectors(n, rng, centres)
    tuning = clustered_vectors(ctx.sizes.search_queries, rng, centres)
    queries = clustered_vectors(ctx.sizes.search_queries, rng, centres)
    label = f"{n // 1000}k" if n < 1_000_000 else f"{n // 1_000_000}M"

    flat = library_index("Flat", data)[0].index
    exact_tuning = flat.search(tuning, 10)[1]
    exact = flat.search(queries, 10)[1]
    flat_ms = latencies_ms(flat, queries[:FLAT_TIMED])
    del flat

    nlist = 1 << int(np.log2(np.sqrt(n)))  # ~sqrt(n): 256 at 100k, 512 at 1M
    kinds = {f"IVF{nlist},Flat": ("nprobe", [v for v in NPROBES if v <= nlist])}
    if n <= ctx.sizes.hnsw_up_to:
        kinds["HNSW32"] = ("efSearch", list(EF_SEARCHES))
    flat50, flat99 = (float(np.percentile(flat_ms, q)) for q in (50, 99))
    metrics, details = [], {"flat_p50_ms": flat50, "flat_timed_queries": len(flat_ms)}
    if n > ctx.sizes.hnsw_up_to and ctx.sizes.hnsw_up_to:
        details["HNSW32"] = "not built at this size (see bench/search.py)"
    at_scale = n >= 1_000_000
    for factory, (param, values) in kinds.items():
        library, build_s = library_index(factory, data)
        value, tuned_recall, default_recall = tune(library, param, values, tuning, exact_tuning)
        recall = recall_at_k(library.index.search(queries, 10)[1], exact)
        ms = latencies_ms(library.index, queries)
        headroom = budget(library, param, values[values.index(value) :], queries[:FLAT_TIMED])
        del library
        name = f"{label} {factory.split(',')[0]}"
        p50, p99 = (float(np.percentile(ms, q)) for q in (50, 99))
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
            "search_params": f"{param}={value}",
            "build_s": build_s,
            "tuning_recall": tuned_recall,
            f"recall_at_faiss_default_{param}": default_recall,
            f"p50_ms_by_{param}": headroom,
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
