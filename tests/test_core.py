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
