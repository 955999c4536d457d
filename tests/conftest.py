"""Test-suite set-up. TRITON_INTERPRET must be set before anything imports triton, so it is set here,
at conftest import, when the machine has no NVIDIA driver (the Makefile sets it too)."""
import os
import shutil

if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("PLOTLY_RENDERER", "plotly_mimetype")  # as in the Makefile: figures stored as JSON only

import pytest  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped on CPU-only machines)")
    config.addinivalue_line("markers", "slow: long-running (minutes)")
    config.addinivalue_line("markers", "notebooks: executes a notebook")
    config.addinivalue_line("markers", "browser: drives a real Chromium")


def pytest_collection_modifyitems(config, items):
    import torch

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="no CUDA device on this machine")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)
