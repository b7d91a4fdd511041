"""The shared search index on disk across restarts of the app (--shared-index, VLM_INDEX_DIR):
what was added through the Search tab's API is found after a restart; stray files in the index
folder are left alone; a damaged index does not keep the app from starting and serving, is
reported, and is left as it was."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import gradio as gr
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from test_app import start_app

from vlm.examples import shapeworld_examples

MODEL = "shapeworld"


def scene_file(folder: Path, name: str, shape: str, colour: str) -> Path:
    """One large object in the middle of a 128-pixel scene, saved as a PNG."""
    from vlm import shapeworld as sw

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    sw.render(sw.Scene((sw.Obj(shape, colour, "large", 0.5, 0.5),)), 128).save(path)
    return path


def shared_app(root: Path, index_dir: Path):
    root.mkdir(parents=True, exist_ok=True)
    return start_app(root, "--shared-index", env={"VLM_INDEX_DIR": str(index_dir)})[:2]


def stop(process) -> None:
    process.terminate()
    process.wait(timeout=30)


def names(hits: list[dict]) -> list[str]:
    """The names the hits were added under (less the content hash in front)."""
    return [Path(hit["image"]).name.split("-", 1)[-1] for hit in hits]


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}  # fmt: skip


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A first run of the app over an index folder holding only stray files: two images added
    through the API. (the index folder, the added files, how many hits before adding)"""
    root = tmp_path_factory.mktemp("first")
    index_dir = root / "indexes"
    (index_dir / MODEL).mkdir(parents=True)
    (index_dir / MODEL / "index-stray.faiss").write_bytes(b"\x01" * 300)
    (index_dir / MODEL / "notes.txt").write_text("not an index")
    added = [scene_file(root / "mine", "mine-cross.png", "cross", "green"),
             scene_file(root / "mine", "mine-star.png", "star", "blue")]  # fmt: skip
    process, url = shared_app(root / "app", index_dir)
    try:
        client = Client(url, verbose=False)
        before = len(client.predict("a shape", None, 24, api_name="/search"))
        _, status = client.predict([handle_file(str(p)) for p in added], MODEL,
                                   api_name="/index_add")  # fmt: skip
        assert status.startswith("Added 2 image(s)"), status
    finally:
        stop(process)
    return index_dir, added, before


def test_stray_files_are_left_beside_the_new_index(saved):
    index_dir, _, _ = saved
    files = snapshot(index_dir / MODEL)
    assert "manifest.json" in files and sum(n.startswith("images/") for n in files) == 2
    assert (index_dir / MODEL / "notes.txt").read_text() == "not an index"
    assert (index_dir / MODEL / "index-stray.faiss").read_bytes() == b"\x01" * 300


def test_what_was_added_is_found_after_a_restart(saved, tmp_path):
    index_dir, added, before = saved
    process, url = shared_app(tmp_path / "second", index_dir)
    try:
        client = Client(url, verbose=False)
        for query, name in (("a large green cross", "mine-cross.png"),
                            ("a large blue star", "mine-star.png")):  # fmt: skip
            assert names(client.predict(query, None, 1, api_name="/search")) == [name]
        assert len(client.predict("a shape", None, 24, api_name="/search")) == before + 2
        found = client.predict("", handle_file(str(added[0])), 1, api_name="/search")
        assert names(found) == ["mine-cross.png"]
    finally:
        stop(process)


def damage_manifest(folder: Path) -> None:
    (folder / "manifest.json").write_bytes(b"\x00not json\xff" * 40)


def truncate_faiss(folder: Path) -> None:
    for path in folder.glob("index-*.faiss"):
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_a_damaged_index_is_reported_and_left_as_it_was(saved, tmp_path):
    """A garbage manifest.json: the app starts and serves; search runs on the bundled examples
    (the page says the saved gallery is damaged, below); an addition is refused with the
    reason, naming the folder; the files are never replaced nor added to."""
    index_dir = tmp_path / "indexes"
    shutil.copytree(saved[0], index_dir)
    damage_manifest(index_dir / MODEL)
    damaged = snapshot(index_dir)
    scene = scene_file(tmp_path / "mine", "query.png", "circle", "red")
    process, url = shared_app(tmp_path / "app", index_dir)
    try:
        client = Client(url, verbose=False)
        assert client.predict(handle_file(str(scene)), api_name="/caption") == (
            "a large red circle"
        )  # it serves
        hits = client.predict("a large green cross", None, 24, api_name="/search")
        assert hits and "mine-cross.png" not in names(hits)  # the bundled examples only
        with pytest.raises(AppError, match=r"indexes/shapeworld.*damaged.*Nothing is added"):
            client.predict([handle_file(str(scene))], MODEL, api_name="/index_add")
        assert process.poll() is None
    finally:
        stop(process)
    assert snapshot(index_dir) == damaged


@pytest.fixture(scope="module")
def app_module():
    import app

    return app


def test_a_truncated_faiss_file_is_reported_in_process(saved, tmp_path, app_module):
    """The same for a FAISS file cut in half, through the page's own handlers: the search runs
    on the bundled examples, and the model's notice and the search's plan say why the rest
    is missing."""
    index_dir = tmp_path / "indexes"
    shutil.copytree(saved[0], index_dir)
    truncate_faiss(index_dir / MODEL)
    damaged = snapshot(index_dir)
    handlers = app_module.make_handlers(app_module.Models(MODEL), index_dir, (), True)
    hits = handlers["search"]("a large green cross", None, 3)
    assert len(hits) == 3
    example = shapeworld_examples()[0][0]  # a path every server reads
    for text in (handlers["notice"](MODEL), handlers["search_plan"]("a cross", None, 0.5, MODEL)):
        assert "indexes/shapeworld" in text and "index files are damaged" in text, text
        assert "only the bundled examples are searched" in text
    with pytest.raises(gr.Error, match="Nothing is added"):
        handlers["index_add"]([str(example)], MODEL, progress=lambda *a, **k: None)
    assert snapshot(index_dir) == damaged


def test_search_still_works_on_what_it_can_with_a_damaged_index(saved, tmp_path, app_module):
    """A damaged index used to make every search fail (a strict xfail until it did not)."""
    index_dir = tmp_path / "indexes"
    shutil.copytree(saved[0], index_dir)
    damage_manifest(index_dir / MODEL)
    handlers = app_module.make_handlers(app_module.Models(MODEL), index_dir, (), True)
    hits = handlers["search"]("a large blue star", None, 3)
    assert hits  # the bundled examples at least
    assert "damaged" in handlers["notice"](MODEL)  # and the page says why the rest is missing
