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
        (["run", "toy", "-p", "n=0"], "parameter 'n' must be ≥ 1, got 0"),
        (["sweep", "toy", "-g", "n=2,-1"], "parameter 'n' must be ≥ 1, got -1"),
        (["list", "nope"], "unknown chapter 'nope'; valid: toy"),
        (["results"], "no complete runs in"),
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
    assert "ZeroDivisionError" in r.stdout and "failed in cell 5 (`if fail: 1 / 0`), line 1: if fail: 1 / 0 after " in r.stdout, r.stdout
    run_dir = next((env / "toy" / "tiny").iterdir())
    assert (run_dir / "executed.ipynb").exists() and not (run_dir / "complete.json").exists()
    assert repro.results("toy").height == 0  # a failed run never counts


def _processes_tagged(tag, within=0.0):
    "Live processes whose environment carries `LIPAPERS_TEST_TAG=tag` (the runner's children inherit it), after waiting up to `within` s."
    deadline = time.time() + within
    while True:
        found = []
        for d in Path("/proc").glob("[0-9]*"):
            try:
                if f"LIPAPERS_TEST_TAG={tag}".encode() in (d / "environ").read_bytes().split(b"\0"):
                    found.append((d.name, (d / "cmdline").read_bytes().replace(b"\0", b" ")[:100].decode(errors="replace")))
            except OSError:
                pass
        if not found or time.time() > deadline:
            return found
        time.sleep(0.5)


def test_interrupted_sweep_resumes_without_losing_finished_runs(env):
    """A sweep killed with SIGKILL leaves no notebook process or kernel behind, keeps its finished runs, and resumes."""
    args = ["sweep", "toy", "-g", "n=1,2,3", "-p", "sleep=1.5", "-j", "1"]
    e = dict(os.environ, LIPAPERS_NBS=str(FIXTURES), LIPAPERS_RUNS=str(env), LIPAPERS_TEST_TAG=os.urandom(6).hex())
    p = subprocess.Popen([LIPAPERS, *args], env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    tiny = env / "toy" / "tiny"
    deadline = time.time() + 240
    while time.time() < deadline and not (tiny.exists() and any(repro.is_complete(d) for d in tiny.iterdir())):
        time.sleep(0.2)
    os.kill(p.pid, signal.SIGKILL)  # kill only the `lipapers` process mid-way, as a crash or a closed terminal would
    p.wait()
    left = _processes_tagged(e["LIPAPERS_TEST_TAG"], within=30)
    assert not left, f"processes of the killed sweep still running: {left}"
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


# --- issue: runs never hang, bad input first, caching that cannot lie, feedback ---------------------------------------

ROOT = Path(__file__).resolve().parents[1]
EXPLORER = Path(__file__).parent / "fixtures" / "explorer" / "nbs"


def test_every_chapter_parameters_cell_parses_in_papermill(caplog, monkeypatch):
    """Under the runner, papermill sees every parameter of every chapter (no 'Unable to parse line', so no 'Passed
    unknown parameter' on override: its own line parser trips on `=` in a comment, so the runner gives it ours), and
    every default and preset value meets its declared check."""
    import logging

    import papermill.engines
    from papermill.inspection import _infer_parameters
    from papermill.iorw import load_notebook_node
    from papermill.translators import PythonTranslator

    monkeypatch.setattr(PythonTranslator, "inspect", PythonTranslator.inspect)  # restored after the test
    monkeypatch.setattr(papermill.engines, "PapermillNotebookClient", papermill.engines.PapermillNotebookClient)
    repro._patch_papermill()
    chapters = repro.chapters(ROOT / "nbs")  # raises if a default or a preset breaks its declared range
    assert len(chapters) >= 8
    for ch in chapters.values():
        nb = load_notebook_node(str(ch.path))  # as papermill reads it
        with caplog.at_level(logging.WARNING, logger="papermill"):
            caplog.clear()
            names = [p.name for p in _infer_parameters(nb, name="python3", language="python")]
        assert not caplog.records, f"{ch.name}: {[r.getMessage() for r in caplog.records]}"
        assert names == list(ch.params), f"{ch.name}: papermill sees {names}"


@pytest.mark.parametrize(
    "args, message",
    [
        (["run", "msam", "-p", "dataset=x"], "parameter 'dataset' must be one of: fashion_mnist, shakespeare; got 'x'"),
        (["run", "msam", "-p", "epochs=0"], "parameter 'epochs' must be >= 1, got 0"),
        (["run", "msam", "-p", "seed=-1"], "parameter 'seed' must be >= 0, got -1"),
        (["run", "msam", "-p", "device=tpu"], "parameter 'device' must be one of: auto, cpu, cuda, mps; got 'tpu'"),
    ],
)
def test_real_chapters_check_declared_ranges_before_any_kernel(args, message, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("LIPAPERS_NBS", raising=False)
    t0 = time.time()
    assert repro.main([*args, "--runs-dir", str(tmp_path / "runs")]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert message in last, last
    assert not (tmp_path / "runs").exists() and time.time() - t0 < 20


def test_runs_dir_that_is_a_file_and_empty_results(tmp_path):
    f = tmp_path / "afile"
    f.write_text("x")
    r = cli("run", "toy", "--runs-dir", str(f), env_vars={"LIPAPERS_NBS": str(FIXTURES)})
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [f"lipapers: error: runs folder '{f}' is a file, not a folder; pass --runs-dir DIR"]
    for d in (tmp_path / "empty", tmp_path / "missing"):
        (tmp_path / "empty").mkdir(exist_ok=True)
        r = cli("results", "--runs-dir", str(d))
        assert r.returncode == 2 and "no complete runs in" in r.stderr and r.stdout == "", (r.stdout, r.stderr)


def test_cli_imports_nothing_heavy_and_answers_fast():
    code = "import sys, lipapers.repro; print(sorted({'torch', 'polars', 'papermill', 'lipapers.core', 'yaml'} & set(sys.modules)))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.stdout.strip() == "[]", r.stdout + r.stderr

    e = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}  # as a user runs it: bytecode cached

    def best(cmd, n=3):
        subprocess.run(cmd, capture_output=True, check=True, env=e)  # warm-up (writes the bytecode cache)
        ts = []
        for _ in range(n):
            t0 = time.perf_counter()
            subprocess.run(cmd, capture_output=True, check=True, env=e)
            ts.append(time.perf_counter() - t0)
        return min(ts)

    bare, helped = best([sys.executable, "-c", "pass"]), best([LIPAPERS, "--help"])
    print(f"python -c pass {bare:.3f}s, lipapers --help {helped:.3f}s, ratio {helped / bare:.1f}")
    assert helped / bare < 4, f"lipapers --help takes {helped / bare:.1f}x `python -c pass`"


def test_cli_version_list_order_and_help_texts(capsys):
    with pytest.raises(SystemExit):
        repro.main(["--version"])
    assert capsys.readouterr().out.strip().startswith("lipapers ")
    names = list(repro.chapters(ROOT / "nbs"))
    nums = [repro._order(repro.chapters(ROOT / "nbs")[n].path)[:2] for n in names]
    assert nums == sorted(nums), names
    ap = repro._parser()
    sub = next(a for a in ap._actions if a.dest == "cmd")
    for name, p in sub.choices.items():
        for a in p._actions:
            assert a.help, f"`lipapers {name}` option {a.option_strings or a.dest} has no help text"


def _copy_toy(tmp_path):
    nbs = tmp_path / "nbs"
    import shutil

    shutil.copytree(FIXTURES, nbs)
    return nbs


def test_stale_runs_override_runs_runs_and_clean(tmp_path, monkeypatch, capsys):
    """A code change makes a complete run stale (re-run, not skipped; left out of results); an override run never
    stands in for the default one; `lipapers runs` shows status and overrides; `clean` removes failed and stale."""
    nbs = _copy_toy(tmp_path)
    runs = tmp_path / "runs"
    monkeypatch.setenv("LIPAPERS_NBS", str(nbs))
    monkeypatch.setenv("LIPAPERS_RUNS", str(runs))
    um = os.umask(0o022)
    try:
        d = repro.run("toy")
        o = repro.run("toy", overrides=["n=2"])
    finally:
        os.umask(um)
    assert (d.status, o.status) == ("complete", "complete")
    for f in ("metrics.parquet", "complete.json", "executed.ipynb"):
        assert (d.path / f).stat().st_mode & 0o777 == 0o644, f  # the user's umask, not mkstemp's 0600
    latest = repro.results("toy", latest=True)
    assert set(latest["run_id"]) == {d.run_id} and latest["default_run"].all()  # o is newer, but has overrides
    assert set(repro.results("toy")["run_id"]) == {d.run_id, o.run_id}
    assert repro.main(["runs", "toy"]) == 0
    out = capsys.readouterr().out
    assert '{"n": 2}' in out and out.count("complete") == 2, out
    # change the chapter's code: both runs are now stale
    f = nbs / "toy" / "01_toy.ipynb"
    f.write_text(f.read_text().replace("if fail: 1 / 0", "if fail: 1 / 0  # changed"))
    assert repro.results("toy").height == 0 and repro.results("toy", stale=True).height > 0
    assert {r["status"] for r in repro.list_runs("toy")} == {"stale"}
    assert [r["run_id"] for r in repro.clean("toy", dry_run=True)] and o.path.exists()
    again = repro.run("toy")
    assert again.status == "complete" and again.run_id == d.run_id, "a stale run is run again, not skipped"
    assert repro.run("toy").status == "skipped"
    gone = repro.clean("toy")
    assert [r["run_id"] for r in gone] == [o.run_id] and not o.path.exists() and d.path.exists()


def test_sweep_force_and_timeout_names_the_cell(env):
    res = repro.sweep("toy", ["n=1"], progress=False)
    assert [r.status for r in res] == ["complete"]
    assert [r.status for r in repro.sweep("toy", ["n=1"], progress=False)] == ["skipped"]
    assert [r.status for r in repro.sweep("toy", ["n=1"], progress=False, force=True)] == ["complete"]
    r = repro.run("toy", overrides=["sleep=120", "n=1"], timeout=45)
    assert r.status == "failed" and "TimeoutError" in r.error and "deadline of 45 s" in r.error, r.error
    assert "failed in cell 4 (`rec = Recorder(\"toy\")`)" in r.error and " after 4" in r.error, r.error
    assert not list(r.path.parent.glob(".*.tmp-*")) and (r.path / "error.json").exists()


def test_sliced_shell_wait_recovers_a_lost_wakeup_and_watchdog_ends_an_idle_wait(monkeypatch):
    """The shell wait returns a reply that a never-resolving (lost wake-up) wait would miss, and raises when the
    kernel has been idle too long without replying."""
    import asyncio
    from queue import Empty

    calls = []

    async def get_msg(timeout=None):
        calls.append(timeout)
        if timeout is None:
            await asyncio.sleep(3600)  # the lost wake-up: an unbounded wait never returns
        if len(calls) < 3:
            await asyncio.sleep(timeout)
            raise Empty
        return {"msg_type": "execute_reply"}

    class Client:
        _idle_at = None

    got = asyncio.run(asyncio.wait_for(repro._sliced(Client(), get_msg)(timeout=None), 5))
    assert got["msg_type"] == "execute_reply" and all(t is not None and t <= repro._SLICE for t in calls)

    async def never(timeout=None):
        await asyncio.sleep(timeout)
        raise Empty

    c = Client()
    c._idle_at = time.monotonic()
    monkeypatch.setattr(repro, "_IDLE_GRACE", 0.5)
    with pytest.raises(TimeoutError, match="went idle"):
        asyncio.run(asyncio.wait_for(repro._sliced(c, never)(timeout=None), 5))


@pytest.mark.slow  # a stress reproduction: two busy loops fill both cores for minutes (349 s at load 30)
def test_explorers_never_hang_in_parallel_sweeps_on_a_busy_cpu(tmp_path):
    """The hang reproduction: many ipywidgets explorer cells (before the fix, 3 of 6 such runs hung at an explorer under
    load), with and without spawned processes earlier in the kernel, two kernels at a time, two busy-loop processes
    keeping both cores full. Every run completes, and every kernel talked over ipc (no TCP ports to collide on)."""
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        t0 = time.time()
        r = cli("sweep", "explorer", "-g", "n=1,2", "-g", "spawn=false,true", "-j", "2", "--timeout", "150",
                env_vars={"LIPAPERS_NBS": str(EXPLORER), "LIPAPERS_RUNS": str(tmp_path / "runs")}, timeout=900)
        print(f"explorer sweep: {time.time() - t0:.0f} s")
    finally:
        for b in busy:
            b.kill()
    assert r.returncode == 0 and "4 run, 0 already complete, 0 failed" in r.stdout, r.stdout + r.stderr[-3000:]
    df = repro.results("explorer", tmp_path / "runs", nbs=EXPLORER)
    assert df.filter(pl.col("metric") == "ipc")["value"].to_list() == [1.0] * 4


# --- sweeps on a Ray cluster: one real local Ray instance (2 CPUs, token authentication) for all these tests -----------


def _within(seconds, fn, *args, **kw):
    """Call `fn` in a thread and fail the test if it has not returned within `seconds` (a deadline on every wait)."""
    import threading

    out = {}

    def go():
        try:
            out["value"] = fn(*args, **kw)
        except BaseException as e:  # noqa: BLE001 - re-raised below in the test's thread
            out["error"] = e

    t = threading.Thread(target=go, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"{getattr(fn, '__name__', fn)} did not return within {seconds} s"
    if "error" in out:
        raise out["error"]
    return out["value"]


# The tests on a real local Ray cluster start one (GCS, raylet, workers) per session: its start-up is the largest single
# cost of this file (385 s at load 30, and past its deadline at load 40), so they run in `make test-all`. The Ray
# executor's bad input and missing-package checks need no cluster and stay in `make test`.
SLOW_RAY = pytest.mark.slow


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray with 2 CPUs, usage statistics and dashboard off, token authentication with a throw-away token;
    shut down (never `ray stop`, which is machine-wide) when the session ends."""
    saved = {k: os.environ.get(k) for k in ("RAY_USAGE_STATS_ENABLED", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    os.environ.update(RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=os.urandom(16).hex())
    ray = repro.ray_connect(None, wait=300, num_cpus=2)
    yield ray
    ray.shutdown()
    for k, v in saved.items():
        os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def _frame(runs):
    cols = ["run_id", "method", "metric", "step", "value", "code_version", "p_n", "p_fail"]
    return repro.results("toy", runs).select(cols).sort(cols)


@SLOW_RAY
def test_ray_sweep_equals_local_records_a_failure_and_resumes(ray_local, tmp_path, monkeypatch):
    monkeypatch.setenv("LIPAPERS_NBS", str(FIXTURES))
    grid = ["n=1,2", "fail=false,true"]
    loc = _within(600, repro.sweep, "toy", grid, jobs=2, runs=tmp_path / "local", progress=False)
    ray = _within(600, repro.sweep, "toy", grid, runs=tmp_path / "ray", progress=False, executor="ray")
    key = lambda rs: sorted((r.run_id, r.status) for r in rs)  # noqa: E731
    assert key(ray) == key(loc) and sorted(r.status for r in ray) == ["complete", "complete", "failed", "failed"]
    assert _frame(tmp_path / "ray").equals(_frame(tmp_path / "local")), "same run ids, same metrics"
    bad = next(r for r in ray if r.status == "failed")
    assert "ZeroDivisionError" in bad.error and not repro.is_complete(bad.path), bad.error
    assert (bad.path / "executed.ipynb").exists(), "the worker's partial notebook comes back with the failure"
    tiny = tmp_path / "ray" / "toy" / "tiny"
    assert not [d for d in tiny.iterdir() if d.name.startswith(".")], "no temporary folder is left in the store"
    gone = next(r for r in ray if r.status == "complete")
    import shutil

    shutil.rmtree(gone.path)
    again = _within(600, repro.sweep, "toy", ["n=1,2", "fail=false"], runs=tmp_path / "ray", progress=False,
                    executor="ray")
    assert sorted(r.status for r in again) == ["complete", "skipped"], "resume runs only the missing point"
    assert [r.run_id for r in again if r.status == "complete"] == [gone.run_id]
    ok = sorted((r for r in loc if r.status == "complete"), key=lambda r: r.params["n"])
    params, m = repro.compare([r.run_id for r in ok], tmp_path / "local")
    assert params == [dict(parameter="n", **{ok[0].run_id: "1", ok[1].run_id: "2"})]
    assert m.columns == ["method", "metric", ok[0].run_id, ok[1].run_id, f"Δ {ok[1].run_id[:6]}"]
    assert m.row(0) == ("toy", "value", 0.0, 2.0, 2.0), "final step: n=1 logs 0, n=2 logs 0 then 2"
    out = repro.plot("toy", "n", "value", by="label", runs=tmp_path / "local", out=tmp_path / "fig" / "p.html")
    html = out.read_text()
    assert (out.parent / "plotly.min.js").exists() and 'src="plotly.min.js"' in html and "cdn" not in html
    assert repro.sweep_frame("toy", "n", "value", runs=tmp_path / "local")["mean"].to_list() == [0.0, 2.0]
    for args, msg in ((["--y", "loss"], "unknown metric 'loss'; valid: value"),
                      (["--y", "value", "--by", "seed"], "unknown column 'seed'; valid: fail, label, method, n, sleep")):
        e = dict(LIPAPERS_NBS=str(FIXTURES), LIPAPERS_RUNS=str(tmp_path / "local"))
        r = cli("plot", "toy", "--x", "n", *args, env_vars=e, timeout=120)
        assert r.returncode == 2 and r.stderr.strip() == f"lipapers: error: {msg}", r.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["sweep", "toy", "-g", "n=1", "--executor", "dask"], "unknown executor 'dask'; valid: local, ray"),
        (["sweep", "toy", "-g", "n=1", "--executor", "ray", "-j", "2"], "-j does not apply to --executor ray"),
        (["sweep", "toy", "-g", "n=1", "--address", "127.0.0.1:6379"], "--address needs --executor ray"),
        (["sweep", "toy", "-g", "n=1", "--executor", "ray", "--address", "127.0.0.1:1"],
         "no Ray cluster answers at 127.0.0.1:1"),
        (["sweep", "toy", "-g", "n=1", "--executor", "ray", "--address", "nohost"], "expected HOST:PORT"),
    ],
)
def test_ray_bad_input_fails_before_anything_runs(env, args, message, capsys):
    assert _within(60, repro.main, args) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("lipapers: error:") and message in last, last
    assert not env.exists() or not any(env.rglob("*"))


def test_ray_missing_package_names_the_install_command(env, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError, as without the extra
    assert repro.main(["sweep", "toy", "-g", "n=1", "--executor", "ray"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "needs the optional ray package: pip install -e '.[ray]'" in last, last


@SLOW_RAY
def test_ray_wrong_token_is_one_clear_error(ray_local, tmp_path):
    addr = ray_local.get_runtime_context().gcs_address
    e = {"LIPAPERS_NBS": str(FIXTURES), "LIPAPERS_RUNS": str(tmp_path), "RAY_AUTH_MODE": "token",
         "RAY_AUTH_TOKEN": "0" * 32, "LIPAPERS_RAY_WAIT": "120"}
    r = cli("sweep", "toy", "-g", "n=1", "--executor", "ray", "--address", addr, env_vars=e, timeout=240)
    errs = [line for line in r.stderr.splitlines() if line.startswith("lipapers: error:")]
    assert r.returncode == 2 and len(errs) == 1 and "RAY_AUTH_TOKEN" in errs[0], r.stderr[-2000:]
    assert errs[0] == r.stderr.strip().splitlines()[-1]
    assert not any(tmp_path.rglob("*")), "nothing ran"


# --- status (claims machinery) and compare -------------------------------------------------------------------------


def test_status_reads_the_claims_machinery_and_shows_not_run(monkeypatch, capsys):
    from lipapers import core

    assert repro.main(["status", "ips"]) == 0
    out = capsys.readouterr().out
    want = core.status_table(core.load_claims("ips", check_presets=False), core.committed_results("ips"), "ips")
    for r in want.iter_rows(named=True):
        assert any(line.split()[:2] == ["ips", r["claim"]] and r["verdict"] in line for line in out.splitlines()), r

    def missing(ch):
        raise FileNotFoundError(ch)

    monkeypatch.setattr(core, "committed_results", missing)
    rows = repro.status("ips")
    assert rows and all(r["verdict"] == "not run" and r["why"] == "no committed results" for r in rows)
    assert repro.main(["status", "nope"]) == 2
    assert "no claims file for chapter 'nope'; chapters with claims:" in capsys.readouterr().err


def test_status_reports_a_broken_claim_as_an_error_not_as_not_run(monkeypatch, capsys):
    import dataclasses
    from lipapers import core

    good = core.load_claims("ips", check_presets=False)
    broken = [dataclasses.replace(good[0], metric="no_such_metric")] + good[1:]
    monkeypatch.setattr(core, "load_claims", lambda ch, check_presets=True: broken)
    assert repro.main(["status", "ips"]) == 2
    assert "metric 'no_such_metric' is not in the results" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, message",
    [
        (["compare", "abcdef123456", "fedcba654321"], "unknown run id 'abcdef123456'; complete runs in"),
        (["compare", "abcdef123456"], "compare needs at least two run ids"),
    ],
)
def test_compare_bad_input(env, args, message, capsys):
    assert repro.main(args) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("lipapers: error:") and message in last, last


def test_cache_list_checksums_and_clear_under_the_builders_lock(tmp_path, monkeypatch, capsys):
    import hashlib
    import threading

    from filelock import FileLock

    monkeypatch.setenv("LIPAPERS_CACHE", str(tmp_path))
    for name, corrupt in (("tiny-aaaa", False), ("tiny-bbbb", True)):
        d = tmp_path / "lm" / name
        d.mkdir(parents=True)
        (d / "model.bin").write_bytes(b"weights")
        (d / "info.json").write_text(json.dumps({"build_seconds": 12.4}))
        man = {f: hashlib.sha256((d / f).read_bytes()).hexdigest() for f in ("model.bin", "info.json")}
        (d / "MANIFEST.json").write_text(json.dumps(man))
        if corrupt:
            (d / "model.bin").write_bytes(b"changed")
    rows = {r["name"]: r for r in repro.cache_entries()}
    assert rows["lm/tiny-aaaa"]["checksum"] == "ok" and rows["lm/tiny-aaaa"]["build_s"] == 12
    assert rows["lm/tiny-bbbb"]["checksum"].startswith("corrupt")
    assert repro.main(["cache", "clear", "lm/nope"]) == 2
    assert "unknown cache entry 'lm/nope'; entries: lm/tiny-aaaa, lm/tiny-bbbb" in capsys.readouterr().err
    lock = FileLock(str(tmp_path / "lm" / "tiny-aaaa.lock"))
    lock.acquire()  # a builder is at work
    t = threading.Thread(target=repro.cache_clear, args=("lm/tiny-a",), daemon=True)
    t.start()
    t.join(1.5)
    assert t.is_alive() and (tmp_path / "lm" / "tiny-aaaa").exists(), "clear waits for the builder's lock"
    lock.release()
    t.join(30)
    assert not t.is_alive() and not (tmp_path / "lm" / "tiny-aaaa").exists()
    assert repro.main(["cache"]) == 0 and "lm/tiny-bbbb" in capsys.readouterr().out


def _worker_processes():
    """Processes whose working folder is a Ray worker's private run folder (the notebook's kernel runs there)."""
    found = []
    for d in Path("/proc").glob("[0-9]*"):
        try:
            if "lipapers-worker-" in os.readlink(d / "cwd"):
                found.append(d.name)
        except OSError:
            pass
    return found


@SLOW_RAY
def test_ray_ctrl_c_cancels_remote_runs_and_their_kernels(ray_local, tmp_path, monkeypatch):
    import ctypes
    import threading

    monkeypatch.setenv("LIPAPERS_NBS", str(FIXTURES))
    out = {}

    def go():
        try:
            repro.sweep("toy", ["n=3,4"], overrides=["sleep=20"], runs=tmp_path, progress=False, executor="ray")
        except KeyboardInterrupt:
            out["interrupted"] = True

    t = threading.Thread(target=go, daemon=True)
    t.start()
    deadline = time.time() + 240
    while time.time() < deadline and len(_worker_processes()) < 2:  # both notebooks' kernels are running
        time.sleep(0.5)
    assert _worker_processes(), "the remote notebooks never started"
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(t.ident), ctypes.py_object(KeyboardInterrupt))  # Ctrl-C
    t.join(60)
    assert not t.is_alive() and out.get("interrupted"), "the sweep stops on Ctrl-C"
    deadline = time.time() + 60
    while time.time() < deadline and _worker_processes():
        time.sleep(0.5)
    assert not _worker_processes(), "cancelled runs leave no notebook process or kernel behind"
    assert not any(repro.is_complete(d) for d in tmp_path.glob("toy/tiny/*")), "a cancelled run is never complete"
