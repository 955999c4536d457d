"""Project invariants: exported code in sync with the notebooks, notebooks clean, the toolchain pins hold,
kernels ship as lipapers.kernels, every chapter follows the contract, the README's two commands are what CI runs."""
import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lipapers import repro

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory):
    """A copy of the project in which nbdev_export and nbdev_clean have been run."""
    tmp = tmp_path_factory.mktemp("proj")
    shutil.copy(ROOT / "settings.ini", tmp)
    shutil.copytree(ROOT / "nbs", tmp / "nbs", ignore=shutil.ignore_patterns(".ipynb_checkpoints", "_proc"))
    shutil.copytree(ROOT / "lipapers", tmp / "lipapers", ignore=shutil.ignore_patterns("__pycache__"))
    for cmd in ("nbdev_export", "nbdev_clean"):
        r = subprocess.run([str(BIN / cmd)], cwd=tmp, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
    return tmp


def files(root, pattern):
    """Files under root, skipping caches and dot-folders (checkpoints), which nbdev ignores too."""
    found = {}
    for p in root.glob(pattern):
        rel = p.relative_to(root)
        if "__pycache__" not in rel.parts and not any(part.startswith(".") for part in rel.parts):
            found[rel] = p.read_bytes()
    return found


def test_exported_code_in_sync_with_notebooks(regenerated):
    ours, fresh = files(ROOT / "lipapers", "**/*.py"), files(regenerated / "lipapers", "**/*.py")
    stale = sorted(str(p) for p in set(ours) | set(fresh) if ours.get(p) != fresh.get(p))
    assert not stale, f"lipapers/ differs from nbdev_export of nbs/: {stale}; run nbdev_export and commit"


def test_notebooks_are_clean(regenerated):
    ours, cleaned = files(ROOT / "nbs", "**/*.ipynb"), files(regenerated / "nbs", "**/*.ipynb")
    dirty = sorted(str(p) for p in ours if ours[p] != cleaned.get(p))
    assert not dirty, f"not clean: {dirty}; run nbdev_clean and commit"


def test_cleaning_keeps_papermill_tags(regenerated):
    for p in (regenerated / "nbs").rglob("*.ipynb"):
        chapter = repro.read_chapter(p)  # raises if the parameters tag was lost while a default_exp exists
        if chapter is not None:
            assert chapter.params


def test_nbdev_pins_hold():
    import nbdev
    import nbdev.diff  # noqa: F401  (fails with unpinned execnb/fastcore)
    import nbdev.release  # noqa: F401

    assert nbdev.__version__ == "2.4.14"


def test_kernels_ship_as_lipapers_kernels():
    import lipapers.kernels

    assert Path(lipapers.kernels.__file__).resolve().parent == ROOT / "kernels"
    assert importlib.util.find_spec("kernels") is None or "lipapers" not in str(importlib.util.find_spec("kernels").origin)


def test_every_chapter_follows_the_contract():
    chapters = repro.chapters(ROOT / "nbs")
    assert chapters, "no chapter found"
    for name, ch in chapters.items():
        for p in ch.params.values():
            assert p.doc, f"{name}: parameter {p.name} has no trailing comment documenting it"
        for preset in ch.presets.values():
            assert preset.target, f"{name}: preset {preset.name} names no paper table/figure"
        text = ch.path.read_text()
        if ch.path.parent != ROOT / "nbs":  # a paper chapter (substrates like world and lm sit at the top of nbs/)
            assert "Reproduction status" in text, f"{name}: no 'Reproduction status' section"
        assert "Recorder(" in text, f"{name}: results are not written through lipapers.core.Recorder"


def test_readme_two_commands_and_ci():
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"^make \w+$", readme, re.M)
    assert commands[:2] == ["make repro", "make test"], commands
    assert "make test" in (ROOT / ".ci" / "run").read_text()


EXPORT_DIRECTIVE = re.compile(r"^#\|\s*(export|exports|exporti|exec_doc)\b", re.M)


def test_no_cell_mixes_imports_with_code():
    """nbdev's docs processing executes every non-export cell that holds an import: such a cell must hold imports only,
    or the docs build would run the experiment code around it."""
    import ast

    bad = []
    for p in sorted(files(ROOT / "nbs", "**/*.ipynb")):
        p = ROOT / "nbs" / p
        for i, c in enumerate(json.loads(p.read_text())["cells"]):
            src = "".join(c["source"]) if isinstance(c["source"], list) else c["source"]
            if c["cell_type"] != "code" or EXPORT_DIRECTIVE.search(src) or "eval: false" in src:
                continue
            code = "\n".join("" if line.lstrip().startswith(("%", "!")) else line for line in src.splitlines())  # IPython magics
            nodes = list(ast.walk(ast.parse(code)))
            if any(isinstance(n, (ast.Import, ast.ImportFrom)) for n in nodes) and any(isinstance(n, (ast.Expr, ast.Assign)) for n in nodes):
                bad.append(f"{p.relative_to(ROOT)} cell {i}")
    assert not bad, f"cells mixing imports and code: {bad}"


def test_every_notebook_names_the_python3_kernel():
    for p in sorted(files(ROOT / "nbs", "**/*.ipynb")):
        p = ROOT / "nbs" / p
        meta = json.loads(p.read_text())["metadata"]
        assert meta.get("kernelspec", {}).get("name") == "python3", f"{p.relative_to(ROOT)}: kernelspec must be python3"
