"""SearchIndex: right hits for text and image queries, persistence, extension, damage."""

from __future__ import annotations

import json

import pytest

from vlm import IndexLoadError, SearchIndex


@pytest.fixture(scope="module")
def index(trained, image_files):
    return trained.build_index(list(image_files.values()), batch_size=2)


def test_text_query_finds_the_right_image_first(index, image_files):
    for caption, path in image_files.items():
        assert index.search(caption, k=3)[0].item == str(path)


def test_image_query_finds_itself(index, image_files):
    for path in image_files.values():
        best = index.search(path, k=1)[0]
        assert best.item == str(path) and best.score > 0.99


def test_save_load_round_trip_gives_the_same_hits(index, trained, tmp_path):
    index.save(tmp_path / "idx")
    again = SearchIndex.load(tmp_path / "idx", trained.encoder)
    assert len(again) == len(index) == 3
    for query in ("a large red square", "a large yellow star"):
        assert again.search(query, k=3) == index.search(query, k=3)


def test_add_more_later_skips_duplicates_and_bad_files(trained, image_files, images, tmp_path):
    paths = list(image_files.values())
    index = trained.build_index(paths[:2])
    assert len(index) == 2
    (tmp_path / "notes.png").write_text("not an image")
    added = index.add([paths[0], paths[2], tmp_path / "notes.png"])
    assert added == 1 and len(index) == 3
    reasons = dict(index.skipped)
    assert "duplicate" in reasons[str(paths[0])]
    assert "not an image" in reasons[str(tmp_path / "notes.png")]
    index.save(tmp_path / "idx")
    index.add([list(images.values())[0].rotate(90)], names=["rotated"])
    index.save(tmp_path / "idx")  # a second save replaces the first version's files
    assert len(list((tmp_path / "idx").glob("index-*.faiss"))) == 1
    assert len(SearchIndex.load(tmp_path / "idx", trained.encoder)) == 4


def test_damaged_or_missing_index_is_a_clear_error(index, trained, tmp_path):
    with pytest.raises(IndexLoadError, match="no search index"):
        SearchIndex.load(tmp_path / "nothing", trained.encoder)
    index.save(tmp_path / "idx")
    manifest = json.loads((tmp_path / "idx" / "manifest.json").read_text())
    (tmp_path / "idx" / manifest["index"]).write_bytes(b"garbage")
    with pytest.raises(IndexLoadError, match="damaged"):
        SearchIndex.load(tmp_path / "idx", trained.encoder)
    (tmp_path / "idx" / "manifest.json").write_text("{")
    with pytest.raises(IndexLoadError, match="damaged"):
        SearchIndex.load(tmp_path / "idx", trained.encoder)


def test_empty_query_is_refused(index):
    with pytest.raises(ValueError, match="empty"):
        index.search("   ")


def test_text_that_looks_like_a_path_is_searched_as_text(index, image_files):
    """Typed text never reaches the server's files: a path in a str is just text."""
    path = str(next(iter(image_files.values())))
    assert all(hit.score < 0.99 for hit in index.search(path, k=3))
    [hit] = index.search("/etc/passwd", k=1)  # text, not a file read: scored as that text
    text = index.encoder.encode_text(["/etc/passwd"])[0].numpy()
    assert hit.score == pytest.approx(float(index.index.reconstruct(hit.position) @ text), abs=1e-5)


def test_decode_threads_worker_processes_and_inline_agree(trained, image_files, tmp_path):
    """Decode threads (the default), DataLoader workers and inline decoding index the same
    vectors in the same order, and report the same unreadable files."""
    from vlm import search

    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    paths = list(image_files.values())
    paths = [paths[0], tmp_path / "broken.png", *paths[1:]]
    built = {}
    for workers in (None, 0, 1):
        index = search.SearchIndex(trained.encoder, num_workers=workers)
        assert index.add(paths, batch_size=2) == 3
        built[workers] = index
    vectors = {w: i.index.reconstruct_n(0, len(i)) for w, i in built.items()}
    for workers in (0, 1):
        assert built[workers].items == built[None].items
        assert built[workers].skipped == built[None].skipped
        assert abs(vectors[workers] - vectors[None]).max() < 1e-5
    assert [item for item, _ in built[None].skipped] == [str(tmp_path / "broken.png")]


def test_decode_threads_stop_when_the_encoder_fails(trained, image_files, monkeypatch):
    import threading

    from vlm import search

    calls = []

    def failing(pixels, normalize=False):
        calls.append(len(pixels))
        raise RuntimeError("encoder failed")

    index = search.SearchIndex(trained.encoder)
    monkeypatch.setattr(trained.encoder, "encode_pixels", failing)
    with pytest.raises(RuntimeError, match="encoder failed"):
        index.add(list(image_files.values()), batch_size=1)
    assert calls == [1] and len(index) == 0
    assert not [t for t in threading.enumerate() if t.name.startswith("vlm-decode")]
