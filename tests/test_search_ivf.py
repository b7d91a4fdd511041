"""SearchIndex with FAISS's approximate indexes (IVF, HNSW): an IVF index trains on the first
vectors it gets, search parameters (nprobe, efSearch) are set, saved and set again on load,
and an empty index searches to nothing, saves and loads."""

from __future__ import annotations

import json
import random

import faiss
import pytest

from vlm import SearchIndex
from vlm import shapeworld as sw


@pytest.fixture(scope="module")
def pictures():
    rng = random.Random(5)
    return [sw.render(sw.sample_scene(rng), 64) for _ in range(48)]


def ivf(index: SearchIndex):
    return faiss.extract_index_ivf(index.index)


def exact_hits(encoder, pictures, query, k):
    flat = SearchIndex(encoder)
    flat.add(pictures, batch_size=16)
    return [(h.position, round(h.score, 4)) for h in flat.search(query, k=k)]


def test_ivf_trains_on_the_first_add_and_then_adds_to_its_lists(trained, pictures):
    index = SearchIndex(trained.encoder, factory="IVF4,Flat", search_params="nprobe=4")
    assert not index.index.is_trained and ivf(index).nprobe == 4
    assert index.search("a large red square") == []  # empty: nothing, not an error
    assert index.add(pictures[:40], batch_size=8) == 40  # 5 batches; it trains on this add
    assert index.index.is_trained and index.index.ntotal == 40
    assert sum(ivf(index).invlists.list_size(i) for i in range(4)) == 40
    assert index.add(pictures[40:], batch_size=8) == 8  # trained now: added as they come
    assert index.index.ntotal == len(index) == 48
    # nprobe = every list: the same hits as an exact index
    query = "a small blue circle"
    found = [(h.position, round(h.score, 4)) for h in index.search(query, k=5)]
    assert found == exact_hits(trained.encoder, pictures, query, 5)
    for position in (0, 17, 47):
        assert index.search(pictures[position], k=1)[0].position == position


def test_search_params_are_saved_and_set_again_on_load(trained, pictures, tmp_path):
    index = SearchIndex(trained.encoder, factory="IVF4,Flat", search_params="nprobe=3")
    index.add(pictures, batch_size=16)
    index.save(tmp_path / "idx")
    manifest = json.loads((tmp_path / "idx" / "manifest.json").read_text())
    assert manifest["factory"] == "IVF4,Flat" and manifest["search_params"] == "nprobe=3"
    loaded = SearchIndex.load(tmp_path / "idx", trained.encoder)
    assert (loaded.factory, loaded.search_params) == ("IVF4,Flat", "nprobe=3")
    assert ivf(loaded).nprobe == 3
    assert loaded.search("a large green star", k=4) == index.search("a large green star", k=4)
    # the manifest decides: a changed setting there is what the loaded index searches with
    manifest["search_params"] = "nprobe=2"
    (tmp_path / "idx" / "manifest.json").write_text(json.dumps(manifest))
    assert ivf(SearchIndex.load(tmp_path / "idx", trained.encoder)).nprobe == 2


def test_hnsw_sets_ef_search_and_keeps_it(trained, pictures, tmp_path):
    index = SearchIndex(trained.encoder, factory="HNSW8", search_params="efSearch=48")
    assert index.index.is_trained and faiss.downcast_index(index.index).hnsw.efSearch == 48
    index.add(pictures, batch_size=16)
    query = "a large yellow triangle"
    found = [(h.position, round(h.score, 4)) for h in index.search(query, k=5)]
    assert found == exact_hits(trained.encoder, pictures, query, 5)  # 48 vectors: exact
    index.save(tmp_path / "hnsw")
    manifest = json.loads((tmp_path / "hnsw" / "manifest.json").read_text())
    manifest["search_params"] = "efSearch=96"
    (tmp_path / "hnsw" / "manifest.json").write_text(json.dumps(manifest))
    loaded = SearchIndex.load(tmp_path / "hnsw", trained.encoder)
    assert faiss.downcast_index(loaded.index).hnsw.efSearch == 96 and len(loaded) == 48


def test_an_empty_untrained_index_saves_loads_and_trains_later(trained, pictures, tmp_path):
    empty = SearchIndex(trained.encoder, factory="IVF4,Flat", search_params="nprobe=4")
    empty.save(tmp_path / "empty")
    loaded = SearchIndex.load(tmp_path / "empty", trained.encoder)
    assert len(loaded) == 0 and loaded.search("a small red cross") == []
    assert not loaded.index.is_trained and ivf(loaded).nprobe == 4
    assert loaded.add(pictures[:12], batch_size=4) == 12 and loaded.index.is_trained
    assert loaded.search(pictures[3], k=1)[0].position == 3


def test_a_bad_factory_or_search_parameter_is_refused(trained):
    with pytest.raises(RuntimeError):
        SearchIndex(trained.encoder, factory="NotAnIndex")
    with pytest.raises(RuntimeError):
        SearchIndex(trained.encoder, factory="IVF4,Flat", search_params="nosuchparam=3")
