"""A saved SearchIndex survives a process killed mid-save, stray files and damaged files.

save() writes new versioned files, then atomically replaces manifest.json; the tests kill a
real child process (SIGKILL) at chosen points of a save and check what is left."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_app import pinned_env

from vlm.search import MANIFEST, IndexLoadError, SearchIndex

ROOT = Path(__file__).resolve().parent.parent
QUERY = "a large red square"

# The child loads the saved pipeline and the index, adds one image, and saves; the save
# stops (writes `ready`, then sleeps) at the chosen point until the test kills it.
CHILD = r"""
import os, sys, tempfile, time
from pathlib import Path

import vlm.search as search
from vlm import Pipeline, shapeworld as sw

model, folder, ready, point = sys.argv[1:5]
folder = Path(folder)
pipe = Pipeline.from_pretrained(model, device="cpu")
index = search.SearchIndex.load(folder, pipe.encoder)
index.add([sw.render(sw.Scene((sw.Obj("star", "blue", "small", 0.3, 0.3),)), 64)])

def hang():
    Path(ready).write_text(str(os.getpid()))
    time.sleep(600)

write, replace = search._write_atomic, os.replace
if point == "mid-write":  # the new FAISS file half written into its temporary file
    def half_write(path, data):
        if path.suffix == ".faiss":
            fd, _ = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
            os.write(fd, data[: len(data) // 2])
            os.fsync(fd)
            hang()
        write(path, data)
    search._write_atomic = half_write
elif point == "before-manifest":  # new versions written, manifest not yet replaced
    def replace_then_hang(src, dst):
        if Path(dst).name == search.MANIFEST:
            hang()
        replace(src, dst)
    search.os.replace = replace_then_hang
elif point == "before-cleanup":  # manifest replaced, the old version's files not yet removed
    search._fsync_dir = lambda directory: hang()
index.save(folder)
print("the save was not interrupted")
"""


def hits(index: SearchIndex) -> list[tuple[str, int, float]]:
    return [(h.item, h.position, round(h.score, 5)) for h in index.search(QUERY, k=3)]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture
def saved_index(trained, images, tmp_path) -> tuple[Path, list]:
    index = trained.build_index(list(images.values()))
    folder = tmp_path / "index"
    index.save(folder)
    return folder, hits(index)


@pytest.mark.parametrize("point", ["mid-write", "before-manifest", "before-cleanup"])
def test_a_save_killed_midway_leaves_a_loadable_index(trained, saved_pipeline, saved_index,
                                                      tmp_path, point):  # fmt: skip
    folder, before = saved_index
    old_files = set(snapshot(folder))
    ready = tmp_path / "ready"
    env = pinned_env(tmp_path, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(saved_pipeline), str(folder), str(ready), point],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        started = time.time()
        while not ready.exists():
            if child.poll() is not None:
                pytest.fail(f"the child ended before the kill point:\n{child.communicate()}")
            if time.time() - started > 600:  # a guard against a hang, not a speed check
                pytest.fail("the child did not reach the kill point in 600 s")
            time.sleep(0.05)
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == -signal.SIGKILL

    files = set(snapshot(folder))
    assert files - old_files, "the save left nothing behind: it was not interrupted"
    loaded = SearchIndex.load(folder, trained.encoder)
    if point == "before-cleanup":  # the new version was committed: it holds one more image
        assert len(loaded) == 4 and loaded.items[:3] == ["image-0", "image-1", "image-2"]
        assert old_files <= files  # the old version's files are left over, harmlessly
    else:  # the previous version, exactly
        assert len(loaded) == 3 and hits(loaded) == before
    if point == "mid-write":  # the half-written temporary file is still there
        assert any(name.startswith(".index-") for name in files - old_files)
    # and the leftovers do not get in the way of the next save
    loaded.save(folder)
    assert hits(SearchIndex.load(folder, trained.encoder)) == hits(loaded)


def test_stray_files_do_not_break_loading(trained, saved_index):
    folder, before = saved_index
    (folder / f".{MANIFEST}.k2j3h4").write_text('{"format": 1, "index": "nope"')
    (folder / ".index-0123456789ab.faiss.x8y9z0").write_bytes(b"\x00" * 100)
    (folder / "index-0123456789ab.faiss").write_bytes(b"garbage")
    (folder / "items-0123456789ab.json").write_text("[")
    (folder / "notes.txt").write_text("left here by someone")
    assert hits(SearchIndex.load(folder, trained.encoder)) == before


def _manifest(folder: Path) -> dict:
    return json.loads((folder / MANIFEST).read_text())


def _half(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _edit_manifest(**changes):
    def damage(folder: Path) -> None:
        manifest = {**_manifest(folder), **changes}
        (folder / MANIFEST).write_text(json.dumps(manifest))

    return damage


def _edit_items(change):
    def damage(folder: Path) -> None:
        path = folder / _manifest(folder)["items"]
        path.write_text(json.dumps(change(json.loads(path.read_text()))))

    return damage


DAMAGE = {
    "manifest-truncated": (lambda f: _half(f / MANIFEST), "manifest.json is damaged"),
    "manifest-empty": (lambda f: (f / MANIFEST).write_text(""), "manifest.json is damaged"),
    "manifest-not-an-object": (lambda f: (f / MANIFEST).write_text("[1, 2]"),
                               "not a vlm search index manifest"),
    "manifest-other-format": (_edit_manifest(format=99), "not a vlm search index manifest"),
    "manifest-missing": (lambda f: (f / MANIFEST).unlink(), "no search index here"),
    "manifest-other-model": (_edit_manifest(dim=512), "built with another model"),
    "faiss-truncated": (lambda f: _half(f / _manifest(f)["index"]), "index files are damaged"),
    "faiss-empty": (lambda f: (f / _manifest(f)["index"]).write_bytes(b""),
                    "index files are damaged"),
    "faiss-missing": (lambda f: (f / _manifest(f)["index"]).unlink(), "index files are damaged"),
    "items-truncated": (lambda f: _half(f / _manifest(f)["items"]), "index files are damaged"),
    "items-one-short": (_edit_items(lambda d: {k: v[:-1] for k, v in d.items()}),
                        "do not match each other"),
}  # fmt: skip

# damage that search.py does not turn into IndexLoadError yet (TypeError/KeyError escape)
UNCAUGHT = {
    "manifest-index-not-a-name": (_edit_manifest(index=5), "index files are damaged"),
    "items-not-an-object": (_edit_items(lambda d: d["items"]), "index files are damaged"),
    "items-without-hashes": (_edit_items(lambda d: {"items": d["items"]}),
                             "index files are damaged"),
}  # fmt: skip


def _check_damage(trained, folder: Path, damage, words: str) -> None:
    damage(folder)
    damaged = snapshot(folder)
    with pytest.raises(IndexLoadError) as error:
        SearchIndex.load(folder, trained.encoder)
    assert str(folder) in str(error.value) and words in str(error.value)
    assert snapshot(folder) == damaged  # left in place, as they were: nothing replaced


@pytest.mark.parametrize("case", DAMAGE)
def test_damaged_index_gives_a_clear_error_and_is_left_in_place(trained, saved_index, case):
    _check_damage(trained, saved_index[0], *DAMAGE[case])


@pytest.mark.parametrize("case", UNCAUGHT)
def test_malformed_index_files_give_a_clear_error(trained, saved_index, case):
    _check_damage(trained, saved_index[0], *UNCAUGHT[case])


def test_a_missing_folder_gives_a_clear_error(trained, tmp_path):
    with pytest.raises(IndexLoadError, match="no search index here"):
        SearchIndex.load(tmp_path / "nowhere", trained.encoder)
    assert not (tmp_path / "nowhere").exists()
