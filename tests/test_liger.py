"""The Liger chapter's own library: the independent memory floor, Liger's chunk rule, the kernel-test record and the
grid helpers (the kernels themselves are tested in tests/kernels/)."""
import json

import polars as pl
import pytest
import torch

import lipapers.kernels as K
from lipapers import liger as L


def test_memory_floor_counts_bytes_by_hand():
    # N=3, H=2, V=5, chunk 2 rows, fp32: dX 6 + dW 10 + chunk 10 elements = 26 * 4 bytes
    assert L.memory_floor(3, 2, 5, 2) == 104
    assert L.memory_floor(3, 2, 5, 2, b=2, bias=True) == (6 + 10 + 5 + 10) * 2
    assert L.memory_floor(3, 2, 5, 99) == (6 + 10 + 15) * 4  # a chunk never exceeds N rows
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="must be an int >= 1"):
            L.memory_floor(3, 2, 5, bad)


@pytest.mark.parametrize("N,H,V,rows", [(4096, 4096, 128256, 128), (16384, 4096, 32000, 2048), (1, 64, 32000, 1),
                                        (1000, 128, 8192, 16), (4096, 128, 65536, 8)])
def test_liger_chunk_rule(N, H, V, rows):
    assert L.liger_chunk_rows(N, H, V) == rows
    c = L.liger_chunk_rows(N, H, V)
    assert c & (c - 1) == 0, "a power of two"


def test_chunk_rules_compare_floors():
    t = L.chunk_rules([(2048, 512, 32768)])
    r = t.row(0, named=True)
    assert r["ours_rows"] == K.flce_chunk_rows(2048, 512, 32768) == 512
    assert r["ours_floor_MiB"] == pytest.approx(132.0)
    assert r["liger_floor_MiB"] < r["ours_floor_MiB"] < r["logits_MiB"] * 2


def test_kernel_test_record(tmp_path):
    rows = [dict(op="rms_norm", test="a", dtype="float32", backend="triton", outcome="passed"),
            dict(op="rms_norm", test="b", dtype="float32", backend="triton", outcome="failed"),
            dict(op="rope", test="c", dtype="", backend="", outcome="skipped")]
    (tmp_path / "gw0-1.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:2]))
    (tmp_path / "gw1-2.jsonl").write_text(json.dumps(rows[2]))
    r = L.kernel_test_record(tmp_path)
    assert r.filter(pl.col("op") == "rms_norm").select("tests", "passed", "failed").row(0) == (2, 1, 1)
    assert r.filter(pl.col("op") == "rope").select("dtype", "backend", "skipped").row(0) == ("—", "both", 1)
    with pytest.raises(FileNotFoundError, match="run pytest tests/kernels"):
        L.kernel_test_record(tmp_path / "empty")


def test_flce_grid_rows_and_summary():
    g = L.flce_grid([32, 48], [100], 8, repeats=3, memory=False, liger_time=True)
    assert set(g["metric"]) == {"time_s", "GFLOPs", "time_ratio"}
    tr = g.filter(pl.col("metric") == "time_ratio")
    assert tr.height == 4 and (tr["lo"] <= tr["value"]).all() and (tr["value"] <= tr["hi"]).all()
    s = L.grid_summary(g)
    assert s.filter(pl.col("method") == "naive")["time_ratio"].is_null().all()
    assert s.height == 6


def test_e2e_step_patched_equals_reference_and_records_pairs():
    d = L.e2e_step(1, 32, 128, 16, repeats=2, warmup=0, memory=False)
    assert sorted(set(d["method"])) == ["hf", "patched"]
    assert d.filter(pl.col("metric") == "tokens_per_s").group_by("method").len()["len"].to_list() == [2, 2]


def test_op_bench_fns_bad_input():
    with pytest.raises(ValueError, match="choose one of 'flce'"):
        L.op_bench_fns("gelu", 4, 4, 4)
    with pytest.raises(ValueError, match="choose 'full' or 'forward'"):
        L.op_bench_fns("flce", 4, 4, 4, mode="both")
