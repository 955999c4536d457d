"""lipapers.core: seeding, device choice, timing, measured peak memory, the run record, the Recorder."""
import random

import numpy as np
import polars as pl
import pytest
import torch

from lipapers.core import Recorder, bench_compare, default_device, env_record, peak_memory, seed_everything


def draw():
    return random.random(), float(np.random.rand()), torch.rand(3)


def test_seed_everything_reproduces_python_numpy_torch():
    seed_everything(123)
    first = draw()
    seed_everything(123)
    second = draw()
    assert first[:2] == second[:2]
    torch.testing.assert_close(first[2], second[2], rtol=0, atol=0)
    seed_everything(124)
    assert draw()[0] != first[0]


@pytest.mark.parametrize("bad", [-1, 2**32, 1.5, "0", True])
def test_seed_rejects_bad_values(bad):
    with pytest.raises(ValueError, match="seed must be an int"):
        seed_everything(bad)


def test_default_device():
    assert default_device("cpu") == torch.device("cpu")
    assert default_device("auto").type in ("cpu", "cuda", "mps")
    with pytest.raises(ValueError, match="valid: auto, cpu, cuda, mps"):
        default_device("tpu")


def test_peak_memory_sees_a_large_allocation():
    mib = 2**20
    big = peak_memory(lambda: torch.ones(48 * mib))  # 192 MiB of float32, touched
    none = peak_memory(lambda: None)
    assert 190 * mib <= big <= 260 * mib, big / mib
    assert none < 16 * mib, none / mib


def test_peak_memory_counts_temporaries_not_inputs():
    mib = 2**20
    x = torch.randn(16 * mib)  # 64 MiB input made before the call: not counted

    def sum_of_squares():
        return (x * x).sum()  # one 64 MiB temporary

    measured = peak_memory(sum_of_squares)
    assert 60 * mib <= measured <= 100 * mib, measured / mib


def test_peak_memory_reports_child_errors():
    with pytest.raises(RuntimeError, match="ZeroDivisionError"):
        peak_memory(lambda: 1 / 0)


def test_bench_compare_interleaves_and_orders_quantiles():
    x = torch.randn(128, 128)
    calls = []
    t = bench_compare({"a": lambda: calls.append("a"), "b": lambda: calls.append("b") or x @ x}, repeats=4, warmup=1)
    assert calls[2:] == ["a", "b"] * 4  # after one warm-up each, repeats alternate
    for timing in t.values():
        assert timing.p20 <= timing.median <= timing.p80 and timing.n == 4
    with pytest.raises(ValueError):
        bench_compare({"a": lambda: None}, repeats=0)


def test_env_record_fields():
    r = env_record(seed=5)
    assert r["seed"] == 5 and r["torch_threads"] >= 1 and r["versions"]["torch"]
    assert "git_sha" in r and "device_name" in r


def test_recorder_writes_long_format(tmp_path):
    rec = Recorder("demo", run_dir=tmp_path)
    rec.log("m", "auc", 0.75, step=1, seed=0)
    path = rec.save()
    df = pl.read_parquet(path)
    assert df.columns[:5] == ["method", "metric", "value", "unit", "step"]
    assert df["value"].to_list() == [0.75]
    assert not list(tmp_path.glob(".*"))  # atomic write leaves no temporary behind


# --- claims machinery -------------------------------------------------------------------------------------------
import numpy as np
import polars as pl
import pytest
from lipapers import core
from lipapers.core import Claim, paired_stats, verdict, status_table


def _results(treat, base, seeds=None):
    seeds = list(range(len(treat))) if seeds is None else seeds
    rows = [dict(method="a", metric="m", value=float(v), seed=s) for v, s in zip(treat, seeds)]
    return pl.DataFrame(rows + [dict(method="b", metric="m", value=float(v), seed=s) for v, s in zip(base, range(len(base)))])


def test_paired_stats_matches_statsmodels_free_formula():
    d = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    s = paired_stats(d)
    from scipy import stats
    half = stats.t.ppf(0.975, 4) * d.std(ddof=1) / np.sqrt(5)
    assert s.lo == pytest.approx(3 - half) and s.hi == pytest.approx(3 + half)
    assert s.mde == pytest.approx((stats.t.ppf(0.975, 4) + stats.t.ppf(0.8, 4)) * d.std(ddof=1) / np.sqrt(5))


@pytest.mark.parametrize("direction,treat,label", [
    ("higher", [1.1, 1.2, 1.15, 1.12], "reproduced"),
    ("lower", [1.1, 1.2, 1.15, 1.12], "contradicted"),
    ("lower", [0.9, 0.8, 0.85, 0.88], "reproduced"),
    ("higher", [1.0, 1.001, 0.999, 1.0], "contradicted"),
    ("higher", [1.5, 0.5, 1.6, 0.4], "cannot discriminate"),
    # MDE (~0.45) far above the effect, but the whole interval lies below 0: the paper's direction is refuted
    ("higher", [0.5, 0.8, 0.3, 0.7], "contradicted"),
])
def test_verdict_rule(direction, treat, label):
    c = Claim("C", "s", "cited", "m", "a", "b", effect=0.1, direction=direction)
    assert verdict(c, _results(treat, [1.0] * 4)).label == label


def test_single_seed_cannot_discriminate_and_gpu_claims_not_run():
    c = Claim("C", "s", "cited", "m", "a", "b", effect=0.1)
    assert verdict(c, _results([2.0], [1.0])).label == "cannot discriminate"
    g = Claim("G", "s", "cited", "tflops", "a", "b", effect=0.1, needs="gpu")
    assert verdict(g, _results([2.0], [1.0])).label == "not run"


def test_one_sample_claim_against_a_threshold():
    c = Claim("M", "memory ≤ 0.2× naive", "cited", "m", "a", direction="lower", null=0.2, effect=0.05)
    df = pl.DataFrame([dict(method="a", metric="m", value=v, seed=i) for i, v in enumerate([0.15, 0.16, 0.14])])
    assert verdict(c, df).label == "reproduced"


def test_fixed_target_missed_with_confidence_is_contradicted():
    c = Claim("T", "exact match >= 0.8", "cited", "m", "a", direction="higher", null=0.8)  # no effect size: a target
    low = pl.DataFrame([dict(method="a", metric="m", value=v, seed=i) for i, v in enumerate([0.30, 0.35, 0.32])])
    assert verdict(c, low).label == "contradicted"
    mixed = pl.DataFrame([dict(method="a", metric="m", value=v, seed=i) for i, v in enumerate([0.5, 1.0, 0.9])])
    assert verdict(c, mixed).label == "cannot discriminate"


def test_requires_a_reproduced_control():
    ctl = Claim("C0", "s", "cited", "m", "a", "b", effect=5.0)  # far below the claimed effect: contradicted
    c = Claim("C1", "s", "cited", "m", "a", "b", effect=0.01, requires=("C0",))
    t = status_table([ctl, c], _results([1.5, 0.6, 1.6, 0.7], [1.0] * 4))
    assert t["verdict"].to_list() == ["contradicted", "cannot discriminate"]
    assert "control C0" in t["why"][1]


def test_load_claims_validates(tmp_path, monkeypatch):
    (tmp_path / "settings.ini").write_text("[DEFAULT]\n")
    part = tmp_path / "nbs" / "part"
    (part / "claims").mkdir(parents=True); (part / "presets" / "ch").mkdir(parents=True)
    (part / "presets" / "ch" / "paper.yaml").write_text("params: {}\n")
    monkeypatch.chdir(tmp_path)
    f = part / "claims" / "ch.yaml"
    f.write_text("claims:\n  - {id: C1, statement: s, cited: c, metric: m, method: a, colour: red}\n")
    with pytest.raises(ValueError, match="unknown fields \\['colour'\\]"): core.load_claims("ch")
    f.write_text("claims:\n  - {id: C1, statement: s, cited: c, metric: m, method: a, where: {preset: tiny}}\n")
    with pytest.raises(ValueError, match="preset 'paper' has no claims"): core.load_claims("ch")
    f.write_text("claims:\n  - {id: C1, statement: s, cited: c, metric: m, method: a, where: {preset: [tiny, paper]}}\n")
    assert [c.id for c in core.load_claims("ch")] == ["C1"]
    f.write_text("claims:\n  - {id: C1, statement: s, cited: c, metric: m, method: a, null: 0.2, where: {preset: paper}}\n")
    assert core.load_claims("ch")[0].null == 0.2  # YAML reads the key `null` as None
