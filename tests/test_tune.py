"""fused_attn.tune's plumbing on the CPU: keys, the per-device results file, the opt-in tuner (with
a fake timer) and its guards, and the CLI without CUDA. Nothing here times a kernel."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import triton
from triton.runtime.errors import OutOfResources

from fused_attn import _launch, tune
from fused_attn.kernels import configs
from fused_attn.kernels.configs import KernelConfig

CUDA = torch.device("cuda", 0)  # only a key here: nothing is allocated on it
H200 = tune.DeviceInfo("NVIDIA H200", 90)
A, B, C = KernelConfig(128, 64, 8, 3), KernelConfig(64, 64, 4, 3), KernelConfig(64, 32, 4, 2)
TABLE = (A, B, C)
KEY = tune.TuneKey(kernel="forward", head_dim=128, dtype="bf16", variant="plain", even_d=True, seq_bucket=4096)


def _entry(key: tune.TuneKey, cfg: KernelConfig, **extra: object) -> dict[str, object]:
    return {"kernel": key.kernel, "head_dim": key.head_dim, "dtype": key.dtype, "variant": key.variant,
            "even_d": key.even_d, "seq_bucket": key.seq_bucket,
            "config": {"block_m": cfg.block_m, "block_n": cfg.block_n, "num_warps": cfg.num_warps,
                       "num_stages": cfg.num_stages}, **extra}


def _write(path: Path, entries: list[dict[str, object]], device: str = H200.name,
           triton_version: str = triton.__version__) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"format": 1, "device": device, "capability": 90, "triton": triton_version,
                                "torch": torch.__version__, "entries": entries}))
    return path


@pytest.fixture(autouse=True)
def tune_dir(monkeypatch, tmp_path):
    """Results under tmp_path, no FUSED_ATTN_TUNE, the CPU's "cuda:0" named NVIDIA H200, and
    nothing loaded before or kept after each test."""
    monkeypatch.setenv(tune.ENV_DIR, str(tmp_path))
    monkeypatch.delenv(tune.ENV_TUNE, raising=False)
    monkeypatch.setattr(tune, "_device_info", lambda device: H200 if device.type == "cuda" else None)
    tune.reset()
    yield tmp_path
    tune.reset()


@pytest.fixture
def timeable(monkeypatch):
    """Make a launch look timeable (compiled kernels, no capture, no compile trace) and replace
    do_bench with a fake timer: returns the per-config times (edit them) and the launches made."""
    monkeypatch.setattr(_launch, "interpreting", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: False)
    times = {A: 2.0, B: 0.5, C: 1.0}
    launched: list[KernelConfig] = []

    def fake_bench(fn):
        fn()
        return times[launched[-1]]

    monkeypatch.setattr(tune, "_bench_ms", fake_bench)
    return times, launched


def _count_warnings(fn) -> tuple[object, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fn()
    return result, [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]


def test_key_buckets_and_names():
    assert [tune.seq_bucket(n) for n in (1, 64, 65, 1000, 4096, 4097, 10**7)] == [64, 64, 128, 1024, 4096, 8192,
                                                                                  65536]
    assert [tune.dtype_name(d) for d in (torch.float16, torch.bfloat16, torch.float32)] == ["fp16", "bf16", "fp32"]
    assert tune.config_label(KernelConfig(128, 64, 8, 3)) == "128x64w8s3"


def test_results_path_is_per_device_and_triton_version(monkeypatch, tune_dir):
    assert tune.results_path("NVIDIA H200", "3.6.0") == tune_dir / "NVIDIA_H200-triton3.6.0.json"
    assert tune.results_path("NVIDIA A100-SXM4-80GB", "3.6.0+git1a2b").name == \
        "NVIDIA_A100_SXM4_80GB-triton3.6.0_git1a2b.json"
    assert tune.results_path("NVIDIA H200").name == f"NVIDIA_H200-triton{triton.__version__}.json"
    monkeypatch.delenv(tune.ENV_DIR)
    assert tune.results_dir() == Path.home() / ".cache" / "fused_attn" / "tune"


def test_no_results_returns_the_table_unchanged():
    assert tune.choose(KEY, CUDA, TABLE, None) is TABLE
    assert tune.choose(KEY, torch.device("cpu"), TABLE, lambda cfg: None) is TABLE


def test_matching_file_puts_its_tile_first(tune_dir):
    other = tune.TuneKey("backward_dq", 64, "fp16", "mask", False, 1024)
    outside = KernelConfig(32, 16, 2, 1)  # not in the table's list: not vetted, never launched
    _write(tune.results_path(H200.name), [_entry(KEY, C), _entry(other, outside)])
    assert tune.choose(KEY, CUDA, TABLE, None) == (C, A, B)
    assert tune.choose(other, CUDA, TABLE, None) is TABLE
    assert tune.choose(tune.TuneKey("forward", 128, "bf16", "plain", True, 8192), CUDA, TABLE, None) is TABLE
    assert tune.choose(tune.TuneKey("forward", 128, "fp16", "plain", True, 4096), CUDA, TABLE, None) is TABLE
    assert tune.choose(KEY, CUDA, (C, A), None) == (C, A)  # already first: the table's tuple as is


def test_file_is_read_once_per_device(monkeypatch, tune_dir):
    _write(tune.results_path(H200.name), [_entry(KEY, B)])
    reads: list[Path] = []
    real = tune.read_results
    monkeypatch.setattr(tune, "read_results", lambda path: reads.append(path) or real(path))
    for _ in range(50):
        assert tune.choose(KEY, CUDA, TABLE, None) == (B, A, C)
    assert reads == [tune.results_path(H200.name)]
    tune.reset()  # a reset reads it again
    tune.choose(KEY, CUDA, TABLE, None)
    assert len(reads) == 2


def test_launcher_key_matches_file_entries(monkeypatch, tune_dir):
    """_launch._kernel_candidates builds the key the file is matched with: head-dim bucket of
    max(D, Dv), EVEN_D, dtype, variant and the bucket of max(seq_q, seq_k)."""
    monkeypatch.setattr(_launch, "interpreting", lambda: False)
    monkeypatch.setattr(_launch, "device_row", lambda index: (90, 232_448, 90))

    class FakeQ:  # what _kernel_candidates reads of q
        device, dtype = CUDA, torch.bfloat16

        @staticmethod
        def element_size() -> int:
            return 2

    table = configs.candidates(90, 128, 2, "plain")["backward_dq"]
    assert len(table) >= 2, "the plain 16-bit rows keep alternatives for the tuner"
    pinned = table[-1]
    key = tune.TuneKey("backward_dq", 128, "bf16", "plain", True, 4096)
    _write(tune.results_path(H200.name), [_entry(key, pinned)])
    expected = (pinned, *table[:-1])
    assert _launch._kernel_candidates("backward_dq", FakeQ(), 128, 128, "plain", 3000, 2049) == expected
    assert _launch._kernel_candidates("backward_dq", FakeQ(), 64, 128, "plain", 100, 4096) == expected
    # another bucket, an uneven head dim, another variant or kernel: the table's list
    assert _launch._kernel_candidates("backward_dq", FakeQ(), 128, 128, "plain", 4097, 4097) == table
    assert _launch._kernel_candidates("backward_dq", FakeQ(), 120, 128, "plain", 4096, 4096) == table
    assert _launch._kernel_candidates("backward_dq", FakeQ(), 128, 128, "mask", 4096, 4096) == \
        configs.candidates(90, 128, 2, "mask")["backward_dq"]
    assert _launch._kernel_candidates("forward", FakeQ(), 128, 128, "plain", 4096, 4096) == \
        configs.candidates(90, 128, 2, "plain")["forward"]


@pytest.mark.parametrize("device, triton_version", [("NVIDIA A100-SXM4-80GB", triton.__version__),
                                                    (H200.name, "3.0.0")])
def test_file_of_another_device_or_version_is_ignored(tune_dir, device, triton_version):
    # Named for the other device / version: never opened.
    _write(tune.results_path(device, triton_version), [_entry(KEY, C)], device, triton_version)
    result, messages = _count_warnings(lambda: tune.choose(KEY, CUDA, TABLE, None))
    assert result is TABLE and messages == []
    # The same content under this device's name (a copied file): read, refused, said once.
    tune.reset()
    _write(tune.results_path(H200.name), [_entry(KEY, C)], device, triton_version)
    result, messages = _count_warnings(lambda: [tune.choose(KEY, CUDA, TABLE, None) for _ in range(3)])
    assert result == [TABLE] * 3
    assert len(messages) == 1 and "ignoring the tuning results" in messages[0] and repr(device) in messages[0]


@pytest.mark.parametrize("text", [
    "{not json",
    "[]",
    json.dumps({"format": 2, "device": H200.name, "triton": triton.__version__, "entries": []}),
    json.dumps({"format": 1, "device": H200.name, "triton": triton.__version__, "entries": {}}),
    json.dumps({"format": 1, "device": H200.name, "triton": triton.__version__,
                "entries": [_entry(KEY, KernelConfig(48, 64, 4, 3))]}),  # block_m not a power of two
    json.dumps({"format": 1, "device": H200.name, "triton": triton.__version__,
                "entries": [{**_entry(KEY, A), "even_d": "yes"}]}),
    json.dumps({"format": 1, "device": H200.name, "triton": triton.__version__,
                "entries": [{**_entry(KEY, A), "config": {"block_m": 128}}]}),
], ids=["not-json", "not-object", "format", "entries", "block", "even_d", "config"])
def test_malformed_file_warns_once_and_is_ignored(tune_dir, text):
    tune.results_path(H200.name).write_text(text)
    other = tune.TuneKey("backward_dq", 64, "fp16", "plain", True, 128)
    results, messages = _count_warnings(
        lambda: [tune.choose(key, CUDA, TABLE, None) for key in (KEY, other, KEY)])
    assert results == [TABLE] * 3
    assert len(messages) == 1 and "ignoring the tuning results" in messages[0]


def test_tuner_times_every_candidate_and_records_the_fastest(monkeypatch, tune_dir, timeable):
    times, launched = timeable
    monkeypatch.setenv(tune.ENV_TUNE, "1")

    def run(cfg: KernelConfig) -> None:
        launched.append(cfg)

    assert tune.choose(KEY, CUDA, TABLE, run) == (B, A, C)
    assert launched == [A, B, C]
    path = tune.results_path(H200.name)
    assert json.loads(path.read_text()) == {
        "format": 1, "device": "NVIDIA H200", "capability": 90, "triton": triton.__version__,
        "torch": torch.__version__,
        "entries": [{"kernel": "forward", "head_dim": 128, "dtype": "bf16", "variant": "plain", "even_d": True,
                     "seq_bucket": 4096,
                     "config": {"block_m": 64, "block_n": 64, "num_warps": 4, "num_stages": 3},
                     "ms": 0.5, "timings_ms": {"128x64w8s3": 2.0, "64x64w4s3": 0.5, "64x32w4s2": 1.0}}]}
    # Known now: no more timing in this process.
    assert tune.choose(KEY, CUDA, TABLE, run) == (B, A, C)
    assert launched == [A, B, C]
    # A second key is appended to the same file.
    key2 = tune.TuneKey("backward_dq", 64, "bf16", "dropout", False, 512)
    times[A] = 0.1
    assert tune.choose(key2, CUDA, TABLE, run) == TABLE
    entries = json.loads(path.read_text())["entries"]
    assert [(e["kernel"], e["config"]["block_m"], e["ms"]) for e in entries] == [("forward", 64, 0.5),
                                                                                ("backward_dq", 128, 0.1)]
    # A later process without FUSED_ATTN_TUNE loads both and times nothing.
    monkeypatch.delenv(tune.ENV_TUNE)
    tune.reset()
    launched.clear()
    assert tune.choose(KEY, CUDA, TABLE, run) == (B, A, C)
    assert tune.choose(key2, CUDA, TABLE, run) == TABLE
    assert launched == []


def test_tuner_skips_tiles_that_fail(monkeypatch, tune_dir, timeable):
    times, launched = timeable
    monkeypatch.setenv(tune.ENV_TUNE, "1")

    def run(cfg: KernelConfig) -> None:
        launched.append(cfg)
        if cfg == B:
            raise OutOfResources(300_000, 232_448, "shared memory")

    result, messages = _count_warnings(lambda: tune.choose(KEY, CUDA, TABLE, run))
    assert result == (C, A, B)  # B would be fastest but cannot launch: C, then the rest as retries
    assert len(messages) == 1 and "64x64w4s3: OutOfResources" in messages[0]
    entry = json.loads(tune.results_path(H200.name).read_text())["entries"][0]
    assert entry["config"]["block_m"] == 64 and entry["config"]["block_n"] == 32
    assert entry["timings_ms"] == {"128x64w8s3": 2.0, "64x32w4s2": 1.0}


def test_tuner_with_every_tile_failing_keeps_the_table_and_writes_nothing(monkeypatch, tune_dir, timeable):
    monkeypatch.setenv(tune.ENV_TUNE, "1")
    calls: list[KernelConfig] = []

    def run(cfg: KernelConfig) -> None:
        calls.append(cfg)
        raise OutOfResources(1, 0, "registers")

    assert tune.choose(KEY, CUDA, TABLE, run) is TABLE
    assert tune.choose(KEY, CUDA, TABLE, run) is TABLE  # not retried on every launch
    assert calls == [A, B, C]
    assert not tune.results_path(H200.name).exists()


def test_single_candidate_is_not_timed(monkeypatch, tune_dir, timeable):
    _, launched = timeable
    monkeypatch.setenv(tune.ENV_TUNE, "1")
    assert tune.choose(KEY, CUDA, (A,), launched.append) == (A,)
    assert launched == [] and not tune.results_path(H200.name).exists()


@pytest.mark.parametrize("situation", ["run is None", "capturing", "compiling", "interpreting", "no opt-in",
                                       "opted out", "cpu"])
def test_nothing_is_timed_when_it_must_not_be(monkeypatch, tune_dir, timeable, situation):
    _, launched = timeable
    monkeypatch.setenv(tune.ENV_TUNE, "1")
    run = launched.append
    device = CUDA
    if situation == "run is None":
        run = None
    elif situation == "capturing":
        monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    elif situation == "compiling":
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    elif situation == "interpreting":
        monkeypatch.setattr(_launch, "interpreting", lambda: True)
    elif situation == "no opt-in":
        monkeypatch.delenv(tune.ENV_TUNE)
    elif situation == "opted out":
        monkeypatch.setenv(tune.ENV_TUNE, "0")
    elif situation == "cpu":
        device = torch.device("cpu")
    assert tune.choose(KEY, device, TABLE, run) is TABLE
    assert launched == [] and not tune.results_path(H200.name).exists()
    if situation in ("capturing", "compiling"):  # the next launch outside capture / tracing times it
        monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: False)
        assert tune.choose(KEY, device, TABLE, run) == (B, A, C)
        assert launched == [A, B, C]


def test_opting_out_ignores_the_file(monkeypatch, tune_dir):
    _write(tune.results_path(H200.name), [_entry(KEY, C)])
    monkeypatch.setenv(tune.ENV_TUNE, "0")
    assert tune.choose(KEY, CUDA, TABLE, None) is TABLE


def test_forced_run_retimes_known_keys_and_reports(monkeypatch, tune_dir, timeable):
    """The CLI's mode: FUSED_ATTN_TUNE unset, the file already has KEY; it is timed again and replaced."""
    times, launched = timeable
    path = _write(tune.results_path(H200.name), [_entry(KEY, A, ms=9.0)])
    with tune._forced_tuning(CUDA) as report:
        assert tune.choose(KEY, CUDA, TABLE, launched.append) == (B, A, C)
        assert tune.choose(KEY, CUDA, TABLE, launched.append) == (B, A, C)  # once per key per run
    assert launched == [A, B, C]
    entries = json.loads(path.read_text())["entries"]
    assert len(entries) == 1 and entries[0]["config"]["block_m"] == 64 and entries[0]["ms"] == 0.5
    lines = tune._format_report(report)
    assert "128x64w8s3" in lines[1] and "table default" in lines[1]
    assert "64x64w4s3" in lines[2] and "chosen" in lines[2] and "4.00x the default" in lines[2]
    assert tune.choose(KEY, CUDA, TABLE, None) == (B, A, C)  # reloaded from the file after the run
    assert launched == [A, B, C]


def test_cli_without_cuda_exits_2(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert tune.main(["--seq", "1024", "--head-dim", "64"]) == 2
    assert "no CUDA device" in capsys.readouterr().err
    assert tune.main(["--show"]) == 2


def test_cli_under_the_interpreter_exits_2(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(_launch, "interpreting", lambda: True)
    assert tune.main([]) == 2
    assert "TRITON_INTERPRET" in capsys.readouterr().err


def test_cli_show_and_clear(monkeypatch, tune_dir, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(_launch, "interpreting", lambda: False)
    monkeypatch.setattr(tune, "_cuda_device_info", lambda index: H200)
    path = _write(tune.results_path(H200.name), [_entry(KEY, B, ms=0.5, timings_ms={"64x64w4s3": 0.5})])
    assert tune.main(["--show"]) == 0
    out = capsys.readouterr().out
    assert str(path) in out and "1 entries" in out
    assert out.splitlines()[-1].split()[:8] == ["forward", "128", "bf16", "plain", "yes", "4096", "64x64w4s3",
                                                "0.5000"]
    assert tune.main(["--clear"]) == 0
    assert not path.exists() and f"removed {path}" in capsys.readouterr().out
    assert tune.main(["--show"]) == 0
    assert "does not exist" in capsys.readouterr().out


@pytest.mark.parametrize("variant", ["plain", "all"])
def test_cli_shape_runs_through_the_public_api(variant, one_cpu_thread):
    """The CLI's call (forward, backward, mask and dropout), at a tiny size on the interpreter."""
    if not _launch.interpreting():
        pytest.skip("runs on CPU tensors under the interpreter")
    args = tune._parser().parse_args(["--batch", "1", "--heads", "2", "--kv-heads", "1", "--seq-k", "40",
                                      "--head-dim-v", "16", "--causal"])
    o = tune._tune_shape(torch.device("cpu"), args, 24, 32, "fp32", variant)
    assert o.shape == (1, 2, 24, 16) and o.dtype == torch.float32 and bool(torch.isfinite(o).all())
    assert o.grad_fn is not None


@pytest.mark.cpu_only(reason="with CUDA this would tune for real")
def test_python_m_without_cuda_exits_2():
    env = {**os.environ}
    env.pop("TRITON_INTERPRET", None)
    result = subprocess.run([sys.executable, "-m", "fused_attn.tune", "--seq", "2048", "--causal"],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "no CUDA device" in result.stderr and "Traceback" not in result.stderr
