"""The reproduction runner: real papermill runs of the toy fixture chapter, every bad input, failures,
resume after an interrupted sweep, and a parallel sweep."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest

from lipapers import repro

FIXTURES = Path(__file__).parent / "fixtures" / "nbs"
LIPAPERS = str(Path(sys.executable).parent / "lipapers")  # the console script installed with the package


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("LIPAPERS_NBS", str(FIXTURES))
    monkeypatch.setenv("LIPAPERS_RUNS", str(tmp_path / "runs"))
    return tmp_path / "runs"


def cli(*args, env_vars=None, timeout=300):
    e = dict(os.environ, **(env_vars or {}))
    return subprocess.run([LIPAPERS, *args], capture_output=True, text=True, env=e, timeout=timeout)


@pytest.mark.parametrize(
    "args, message",
    [
        (["run", "nope"], "unknown chapter 'nope'; valid: toy"),
        (["run", "toy", "--preset", "huge"], "unknown preset 'huge' for chapter 'toy'; valid: tiny, big"),
        (["run", "toy", "-p", "steps=3"], "unknown parameter 'steps' for chapter 'toy'; valid: n, label, fail, sleep"),
        (["run", "toy", "-p", "n=1; import os"], "parameter 'n' expects int, got '1; import os'"),
        (["run", "toy", "-p", "n"], "malformed -p 'n'; expected key=value"),
        (["run", "toy", "-p", "fail=maybe"], "parameter 'fail' expects bool"),
        (["sweep", "toy", "-g", "n=1,x"], "parameter 'n' expects int, got 'x'"),
        (["sweep", "toy", "-g", "n"], "malformed -g 'n'; expected key=value"),
        (["sweep", "toy", "-g", "n=1,,2"], "empty value"),
        (["sweep", "toy"], "sweep needs at least one -g"),
        (["sweep", "toy", "-g", "n=1", "-j", "0"], "-j must be >= 1"),
        (["results", "nope"], "no runs of chapter 'nope'"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_bad_input_fails_before_anything_runs(env, args, message, capsys):
    assert repro.main(args) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("lipapers: error:") and message in last, last
    assert not env.exists() or not any(env.rglob("*")), "no run folder may be written on bad input"


def test_bad_input_from_the_real_command_line(env):
    r = cli("run", "toy", "-p", "n=1; import os", env_vars={"LIPAPERS_NBS": str(FIXTURES), "LIPAPERS_RUNS": str(env)})
    assert r.returncode == 2 and r.stderr.strip() == "lipapers: error: parameter 'n' expects int, got '1; import os'"
    assert not env.exists()


def test_str_parameter_stays_a_plain_string(env):
    r = repro.run("toy", overrides=["label=1; import os", "n=1"])
    assert r.status == "complete"
    df = repro.results("toy")
    assert df["label"].to_list() == ["1; import os"] and df["p_label"].to_list() == ["1; import os"]


def test_run_writes_every_file_and_skips_when_complete(env):
    r = repro.run("toy", preset="big")
    assert r.status == "complete" and r.path == env / "toy" / "big" / r.run_id
    for f in ("executed.ipynb", "params.json", "env.json", "metrics.parquet", "complete.json"):
        assert (r.path / f).exists(), f
    assert json.loads((r.path / "params.json").read_text())["params"]["n"] == 10
    df = pl.read_parquet(r.path / "metrics.parquet")
    assert df.height == 10 and set(df["p_n"]) == {10} and set(df["run_id"]) == {r.run_id}
    for col in ("chapter", "run_id", "preset", "method", "metric", "value", "unit", "step"):
        assert col in df.columns
    assert repro.run("toy", preset="big").status == "skipped"


def test_failing_notebook_names_cell_keeps_partial_and_is_not_complete(env):
    r = cli("run", "toy", "-p", "fail=true", env_vars={"LIPAPERS_NBS": str(FIXTURES), "LIPAPERS_RUNS": str(env)})
    assert r.returncode == 1
    assert "ZeroDivisionError" in r.stdout and "if fail: 1 / 0" in r.stdout
    run_dir = next((env / "toy" / "tiny").iterdir())
    assert (run_dir / "executed.ipynb").exists() and not (run_dir / "complete.json").exists()
    assert repro.results("toy").height == 0  # a failed run never counts


def test_interrupted_sweep_resumes_without_losing_finished_runs(env):
    args = ["sweep", "toy", "-g", "n=1,2,3", "-p", "sleep=1.5", "-j", "1"]
    e = dict(os.environ, LIPAPERS_NBS=str(FIXTURES), LIPAPERS_RUNS=str(env))
    p = subprocess.Popen([LIPAPERS, *args], env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    tiny = env / "toy" / "tiny"
    deadline = time.time() + 240
    while time.time() < deadline and not (tiny.exists() and any(repro.is_complete(d) for d in tiny.iterdir())):
        time.sleep(0.2)
    os.killpg(p.pid, signal.SIGKILL)  # kill the sweep and its notebook process mid-way, as a crash would
    p.wait()
    done = [d for d in tiny.iterdir() if repro.is_complete(d)]
    assert 1 <= len(done) < 3
    assert all(not d.name.startswith(".") for d in done)
    assert all(d.name.startswith(".") for d in tiny.iterdir() if not repro.is_complete(d)), "no half-written run may look finished"
    before = {d.name: (d / "complete.json").stat().st_mtime for d in done}
    res2 = cli(*args, env_vars={"LIPAPERS_NBS": str(FIXTURES), "LIPAPERS_RUNS": str(env)})
    assert res2.returncode == 0 and f"{len(done)} already complete" in res2.stdout, res2.stdout
    assert not [d for d in tiny.iterdir() if d.name.startswith(".")], "stale temporary folders are cleaned"
    assert all((tiny / n / "complete.json").stat().st_mtime == t for n, t in before.items()), "finished runs are not redone"
    assert sum(repro.is_complete(d) for d in tiny.iterdir()) == 3


def test_parallel_sweep_with_a_failing_point_goes_on(env):
    res = repro.sweep("toy", ["n=1,2", "fail=false,true"], jobs=2, progress=False)
    assert sorted(r.status for r in res) == ["complete", "complete", "failed", "failed"]
    df = repro.results("toy")
    assert sorted(df.group_by("run_id").len()["len"].to_list()) == [1, 2]
