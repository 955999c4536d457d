"""Every notebook under nbs/ executes at its defaults (one pytest test per notebook), through nbdev's test_nb,
whose return value is asserted (it never raises on its own)."""
from pathlib import Path

import pytest
from nbdev.config import get_config
from nbdev.doclinks import nbglob
from nbdev.test import test_nb as run_nb

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted(Path(p) for p in nbglob(ROOT / "nbs"))


@pytest.mark.notebooks
@pytest.mark.parametrize("nb", NOTEBOOKS, ids=[str(p.relative_to(ROOT / "nbs")) for p in NOTEBOOKS])
def test_notebook_runs_at_defaults(nb):
    ok, seconds = run_nb(nb, skip_flags=get_config().tst_flags.split())
    assert ok, f"{nb.name} failed (see the traceback above)"
