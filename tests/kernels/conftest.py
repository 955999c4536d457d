"""The kernel tests keep their own record: one JSON line per test (op, dtype, backend, outcome, seconds), written to
`runs/kernel-tests/` so that the Liger chapter shows correctness from what the suite actually ran, never typed text.
Each pytest process that runs tests (each xdist worker) writes its own file; `lipapers.liger.kernel_test_record`
gathers them."""
import json
import os
import time

import pytest
import torch


def _record_file():
    from lipapers.core import runs_root

    d = runs_root() / "kernel-tests"
    d.mkdir(parents=True, exist_ok=True)
    return d / f"{os.environ.get('PYTEST_XDIST_WORKER', 'main')}-{os.getpid()}.jsonl"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.when != "call" and not (report.when == "setup" and report.outcome != "passed"):
        return
    params = getattr(getattr(item, "callspec", None), "params", {})
    dtype = next((str(v).removeprefix("torch.") for v in params.values() if isinstance(v, torch.dtype)), "")
    backend = next((v for v in params.values() if v in ("triton", "torch")), "")
    row = dict(op=item.module.__name__.removeprefix("test_"), test=item.name, dtype=dtype, backend=backend,
               outcome=report.outcome, seconds=round(report.duration, 4), time=time.strftime("%Y-%m-%dT%H:%M:%S"))
    with open(_record_file(), "a") as f:
        f.write(json.dumps(row) + "\n")
