"""Test set-up: without a GPU the Triton kernels run on CPU tensors through the interpreter.

TRITON_INTERPRET must be set before triton is first imported (it is read when @triton.jit
decorates), so this runs before anything imports fused_attn.

Markers (the GPU-twin convention is in tests/helpers.py): `gpu` (registered in pyproject.toml)
needs a CUDA GPU and is skipped without one; `cpu_only(reason=...)` is the no-GPU path only and is
skipped where CUDA is available. The `device` fixture is "cuda" on a GPU machine, else "cpu".
"""
import os
import sys

import torch

if not torch.cuda.is_available():
    assert "triton" not in sys.modules, "triton was imported before the interpreter could be enabled"
    os.environ["TRITON_INTERPRET"] = "1"

import json  # noqa: E402
import tempfile  # noqa: E402

import pytest  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def device() -> str:
    return DEVICE


@pytest.fixture
def one_cpu_thread():
    """torch on one CPU thread for the test, restored after: pytest-xdist already runs a worker
    per core, and small reference ops were 10-50x slower with torch's default thread count (the
    interpreter's cost is Python overhead, which threads do not help)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_configure(config):
    config.addinivalue_line("markers", "cpu_only(reason): the no-GPU path only; skipped where CUDA is available")
    # Workers (pytest-xdist) inherit this and append their ratios; the controller sums them up.
    # A controller always starts its own log: a pytest run inside a test (the GPU suite's test)
    # must not read and delete the outer run's.
    if not hasattr(config, "workerinput"):
        fd, path = tempfile.mkstemp(prefix="fused_attn_ratios_", suffix=".jsonl")
        os.close(fd)
        os.environ["FUSED_ATTN_RATIO_LOG"] = path


def pytest_collection_modifyitems(config, items):
    cuda = torch.cuda.is_available()
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU; the CPU twin runs the same checks at small sizes")
    for item in items:
        if not cuda and item.get_closest_marker("gpu") is not None:
            item.add_marker(skip_gpu)
        cpu_only = item.get_closest_marker("cpu_only")
        if cuda and cpu_only is not None:
            reason = cpu_only.kwargs.get("reason") or (cpu_only.args[0] if cpu_only.args else "the no-GPU path only")
            item.add_marker(pytest.mark.skip(reason=reason))


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """Worst kernel-error / PyTorch-error ratio seen per dtype and quantity over the whole run."""
    path = os.environ.get("FUSED_ATTN_RATIO_LOG")
    if hasattr(config, "workerinput") or not path or not os.path.exists(path):
        return
    worst: dict[tuple[str, str], float] = {}
    count = 0
    with open(path) as f:
        for line in f:
            row = json.loads(line)
            key = (row["dtype"], row["name"])
            worst[key] = max(worst.get(key, 0.0), row["ratio"])
            count += 1
    os.unlink(path)
    if not worst:
        return
    terminalreporter.section("fused_attn: worst kernel error / same-dtype PyTorch error")
    terminalreporter.write_line(f"{count} comparisons against the float64 reference")
    for (dtype, name), ratio in sorted(worst.items()):
        terminalreporter.write_line(f"{dtype:>9} {name:>4}: {ratio:.3f}")
