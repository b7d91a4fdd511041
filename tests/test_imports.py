"""Imports in `vlm/` flow one way: no module imports one that imports it back, however deep
the circle and wherever the import sits (at the top of the file or inside a function)."""

from __future__ import annotations

import ast
from pathlib import Path

VLM = Path(__file__).resolve().parent.parent / "vlm"


def module_name(path: Path) -> str:
    """A file's module under vlm, dotted ("pipeline", "training.run"; a package's __init__
    is the package: "training")."""
    parts = path.relative_to(VLM).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p) for p in VLM.rglob("*.py") if p.name != "__main__.py"} - {""}


def vlm_imports(source: str, modules: set[str] = MODULES, package: str = "") -> set[str]:
    """The vlm modules a module's `source` imports anywhere in it: `from .x import y`,
    `from ..x import y`, `from . import x`, `import vlm.x`, `from vlm.x import y`,
    `from vlm import x`; `package`: the sub-package the module is in ("" at the top)."""
    found = set()

    def add(dotted: str, names=()) -> None:
        for name in names:  # `from p import m`: the module p.m where there is one
            if f"{dotted}.{name}".strip(".") in modules:
                found.add(f"{dotted}.{name}".strip("."))
                continue
            found.add(dotted)
        if not names:
            found.add(dotted)

    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("vlm."):
                    add(alias.name.removeprefix("vlm."))
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                if node.module != "vlm" and not (node.module or "").startswith("vlm."):
                    continue  # another package
                base = (node.module or "").removeprefix("vlm").lstrip(".")
            else:
                up = package.split(".") if package else []
                up = up[: len(up) - (node.level - 1)]
                base = ".".join([*up, *([node.module] if node.module else [])])
            add(base, [a.name for a in node.names])
    return {m for m in found if m} & modules


def import_graph() -> dict[str, set[str]]:
    graph = {}
    for path in VLM.rglob("*.py"):
        if path.name == "__main__.py":
            continue
        name = module_name(path)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        graph[name] = vlm_imports(path.read_text(), MODULES, package) - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One circle of imports as the modules along it (the first one again at the end)."""
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> list[str] | None:
        if module in path:
            return path[path.index(module) :] + [module]
        if module in done:
            return None
        for target in sorted(graph.get(module, ())):
            if cycle := visit(target, [*path, module]):
                return cycle
        done.add(module)
        return None

    return next((c for m in sorted(graph) if (c := visit(m, []))), None)


def test_the_walk_sees_every_form_of_import_at_any_depth():
    source = (
        "import os\nfrom .a import x\nimport vlm.b\nfrom vlm.c import y\nfrom . import d\n"
        "from vlm import e\nfrom torch import nn\n"
        "def f():\n    from .g import z\n    class C:\n        import vlm.h\n"
    )
    modules = set("abcdefgh") | {"os", "torch", "nn"}
    assert vlm_imports(source, modules) == set("abcdegh")


def test_find_cycle_finds_a_deep_circle():
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"b"}}) == ["b", "c", "b"]


def test_the_walk_resolves_imports_inside_sub_packages():
    modules = {"errors", "training", "training.run", "training.loop", "shapeworld"}
    source = (
        "from ..errors import E\nfrom .loop import run_stage\nfrom . import run\n"
        "from vlm.training import train\nfrom .. import shapeworld\n"
    )
    assert vlm_imports(source, modules, package="training") == {
        "errors",
        "training.loop",
        "training.run",
        "training",
        "shapeworld",
    }
    assert {"training", "training.run", "training.jobs"} <= MODULES


def test_no_module_in_vlm_imports_one_that_imports_it_back():
    cycle = find_cycle(import_graph())
    assert cycle is None, " -> ".join(cycle)


def test_importing_the_library_changes_nothing_process_wide():
    """`import vlm` and every module in it leave Pillow's global limit, the warning filters
    and the torch thread count as the application had them (the libraries it builds on are
    imported first: what they change on import is theirs)."""
    import subprocess
    import sys

    modules = sorted(MODULES)
    child = (
        "import warnings, torch, transformers, open_clip, faiss, accelerate, safetensors\n"
        "import scipy.special, scipy.sparse\n"
        "from PIL import Image\n"
        "Image.MAX_IMAGE_PIXELS = 123\n"
        "before = (Image.MAX_IMAGE_PIXELS, list(warnings.filters), torch.get_num_threads())\n"
        f"for name in {modules!r}:\n"
        "    __import__('vlm.' + name)\n"
        "after = (Image.MAX_IMAGE_PIXELS, list(warnings.filters), torch.get_num_threads())\n"
        "print(before == after, before[0], after[0], after[2])\n"
    )
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(VLM.parent), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True,
                            env=env, cwd=VLM.parent, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[0] == "True", result.stdout
