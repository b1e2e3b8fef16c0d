"""The tile sweep's plumbing (bench/tile_sweep.py) at tiny sizes: on the CPU through the Triton
interpreter with a fake timer and a fake clock; one GPU-marked test runs it for real on CUDA.

Nothing here asserts a speed: the fake timer decides which tile is "fastest", and the tests check
that the sweep picks the fastest tile whose output passed, never a wrong one, writes the JSON the
tuner reads, and stops cleanly at its deadline.
"""
from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fused_attn
from bench import gpu_suite, tile_sweep
from bench.tile_sweep import DeviceInfo, Shape, config_label
from fused_attn.kernels import attention as kernels
from fused_attn.kernels import configs
from fused_attn.kernels.configs import KernelConfig

REPO = Path(__file__).resolve().parent.parent
cpu_only = pytest.mark.cpu_only(reason="the interpreter path; a GPU machine runs the GPU twin")

K = KernelConfig
FAKE_GPU = DeviceInfo("Fake GPU 80GB", 90, None, "cpu", "3.9.0", torch.__version__)
SHAPES = [Shape(1, 1, 64, 16, causal) for causal in (False, True)]
# Shipped first, as configs.candidates orders them. Under the interpreter a pinned tile is used as is.
TILES = {
    "forward": (K(32, 32, 4, 1), K(64, 32, 4, 1), K(16, 32, 4, 1)),
    "backward_dkdv": (K(32, 32, 4, 1), K(16, 64, 4, 1), K(32, 64, 4, 1)),
    "backward_dq": (K(32, 32, 4, 1), K(64, 16, 4, 1), K(16, 32, 4, 1)),
}
# Fake milliseconds per (kernel, tile, causal). The forward's winner needs both settings summed
# (64x32 wins the full case, 16x32 the causal one, 64x32 the sum). The dQ tile with block_m 16
# is "fastest" but leaves half its rows unwritten; dK/dV's 16x64 "fails" with finite wrong values.
FAKE_MS = {
    ("forward", "32x32w4s1"): (3.0, 3.0), ("forward", "64x32w4s1"): (1.0, 2.5), ("forward", "16x32w4s1"): (2.0, 1.8),
    ("backward_dkdv", "32x32w4s1"): (4.0, 4.0), ("backward_dkdv", "16x64w4s1"): (0.5, 0.5),
    ("backward_dkdv", "32x64w4s1"): (3.0, 3.5),
    ("backward_dq", "32x32w4s1"): (2.0, 2.0), ("backward_dq", "64x16w4s1"): (1.5, 1.5),
    ("backward_dq", "16x32w4s1"): (0.1, 0.1),
}


def fake_time_fn(calls: list | None = None, clock: list[float] | None = None, step_s: float = 0.0):
    """A timer that runs `fn` once (so the replayed launch is exercised) and returns FAKE_MS;
    it advances the fake `clock` by `step_s` per call."""
    def time_fn(fn, what: tile_sweep.Timed) -> float:
        fn()
        if calls is not None:
            calls.append(what)
        if clock is not None:
            clock[0] += step_s
        if what.config is None:
            return 5.0
        return FAKE_MS[(what.kernel, config_label(what.config))][int(what.shape.causal)]
    return time_fn


def fake_candidates(capability, head_dim, element_size, variant="plain", shared_memory=None):
    return TILES


class _Faulty:
    """Stands in for a Triton kernel: launches the real one, then misbehaves for one tile."""

    def __init__(self, real, fault, block_m, block_n=None):
        self.real, self.fault, self.block_m, self.block_n = real, fault, block_m, block_n
        self.fn = real.fn  # the launcher reads the kernel's parameter names from it

    def _hit(self, kwargs) -> bool:
        return kwargs.get("BLOCK_M") == self.block_m and self.block_n in (None, kwargs.get("BLOCK_N"))

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            if not self._hit(kwargs):
                return self.real[grid](*args, **kwargs)
            if self.fault == "half grid":  # forgets the programs of the second half: rows left unwritten
                return self.real[(max(1, grid[0] // 2),)](*args, **kwargs)
            # "scaled": right kernel, then every tensor it wrote is 10% off (found by what changed)
            floats = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor) and a.is_floating_point()]
            before = [a.clone() for a in floats]
            self.real[grid](*args, **kwargs)
            for tensor, old in zip(floats, before):
                if not torch.equal(tensor, old):
                    tensor.mul_(1.1)
        return launch


@pytest.fixture(scope="module")
def faulty_sweep(tmp_path_factory):
    """One sweep of two shapes with a fault in a dQ tile and one in a dK/dV tile."""
    out = tmp_path_factory.mktemp("sweep")
    patch = pytest.MonkeyPatch()
    patch.setattr(kernels, "_attn_bwd_dq", _Faulty(kernels._attn_bwd_dq, "half grid", 16, 32))
    patch.setattr(kernels, "_attn_bwd_dkdv", _Faulty(kernels._attn_bwd_dkdv, "scaled", 16, 64))
    calls: list = []
    try:
        result = tile_sweep.sweep(SHAPES, FAKE_GPU, fake_time_fn(calls), out_dir=out, candidates_fn=fake_candidates,
                                  log=lambda line: None)
    finally:
        patch.undo()
    return result, out, calls


def _rows(result, kernel, causal=None):
    return [r for r in result.rows if r["provider"] == "fused_attn" and r["kernel"] == kernel
            and (causal is None or r["causal"] == causal)]


@cpu_only
def test_sweep_times_every_tile_and_checks_it(faulty_sweep) -> None:
    result, _, calls = faulty_sweep
    assert not result.stopped and not result.shipped_failures and not result.errors
    for kernel, tiles in TILES.items():
        for causal in (False, True):
            rows = _rows(result, kernel, causal)
            assert [r["config"] for r in rows] == [config_label(c) for c in tiles]
            assert [r["shipped"] for r in rows] == [True, False, False]
            shipped = rows[0]
            assert shipped["status"] == "ok" and shipped["vs_shipped"] == 1.0
            assert max(shipped[f"err_{n}"] for n in ("o", "dq", "dk", "dv")) < 2e-2  # against torch SDPA
    timed_kernels = {(c.kernel, config_label(c.config)) for c in calls if c.config is not None}
    assert timed_kernels == set(FAKE_MS)
    # Reference providers in the same run; cuDNN is unavailable on the CPU and says so.
    by_provider = {(r["provider"], r["kernel"], r["causal"]): r for r in result.rows}
    for causal in (False, True):
        assert by_provider[("sdpa_flash", "fwd", causal)]["status"] == "ok"
        assert by_provider[("sdpa_flash", "fwd+bwd", causal)]["status"] == "ok"
        cudnn = by_provider[("sdpa_cudnn", "fwd", causal)]
        assert cudnn["status"] == "skipped" and cudnn["reason"].startswith("unavailable:")
        assert by_provider[("fused_attn", "fwd+bwd", causal)]["status"] == "ok"
        assert by_provider[("fused_attn_best", "fwd+bwd", causal)]["status"] == "ok"
    # TFLOP/s by the stated convention: 4*B*H*S^2*D, halved for causal; dQ counted 1.5x.
    dq_full = _rows(result, "backward_dq", False)[0]
    assert dq_full["tflops"] == pytest.approx(1.5 * 4 * 64 * 64 * 16 / 2.0 / 1e9)
    dq_causal = _rows(result, "backward_dq", True)[0]
    assert dq_causal["tflops"] == pytest.approx(1.5 * 4 * 64 * 64 * 16 / 2 / 2.0 / 1e9)


@cpu_only
def test_faulty_tiles_fail_their_check(faulty_sweep) -> None:
    result, _, _ = faulty_sweep
    for causal in (False, True):
        unwritten = next(r for r in _rows(result, "backward_dq", causal) if r["config"] == "16x32w4s1")
        assert unwritten["status"] == "check failed" and unwritten["err_dq"] == math.inf  # poisoned rows stay NaN
        scaled = next(r for r in _rows(result, "backward_dkdv", causal) if r["config"] == "16x64w4s1")
        assert scaled["status"] == "check failed" and 0.05 < scaled["err_dk"] < math.inf
        assert "tolerance" in scaled["reason"]
    faulty = {("backward_dq", "16x32w4s1"), ("backward_dkdv", "16x64w4s1")}
    others = [r for r in result.rows if r["provider"] == "fused_attn" and r["kernel"] in tile_sweep.KERNELS
              and (r["kernel"], r["config"]) not in faulty]
    assert len(others) == 2 * 7 and all(r["status"] == "ok" for r in others)


@cpu_only
def test_winners_are_the_fastest_passing_tiles(faulty_sweep) -> None:
    result, out, _ = faulty_sweep
    winners = {e["kernel"]: e for e in result.entries}
    # forward: 64x32 has the least time over both causal settings (1.0 + 2.5), though 16x32 wins causal
    assert winners["forward"]["config"] == {"block_m": 64, "block_n": 32, "num_warps": 4, "num_stages": 1}
    assert winners["forward"]["ms"] == pytest.approx(1.75)
    assert winners["forward"]["timings_ms"] == pytest.approx({"32x32w4s1": 3.0, "64x32w4s1": 1.75, "16x32w4s1": 1.9})
    # the "fastest" tiles of dK/dV and dQ gave wrong outputs: the next fastest passing one wins
    assert winners["backward_dkdv"]["config"] == {"block_m": 32, "block_n": 64, "num_warps": 4, "num_stages": 1}
    assert "16x64w4s1" not in winners["backward_dkdv"]["timings_ms"]
    assert winners["backward_dq"]["config"] == {"block_m": 64, "block_n": 16, "num_warps": 4, "num_stages": 1}
    assert "16x32w4s1" not in winners["backward_dq"]["timings_ms"]
    best = next(r for r in result.rows if r["provider"] == "fused_attn_best" and not r["causal"])
    assert best["config"] == "64x32w4s1 32x64w4s1 64x16w4s1"
    tables = (out / "tile_sweep.md").read_text()
    assert tables == tile_sweep.format_tables(result.rows) + "\n"
    assert "| 16 | 64 | False | backward_dq | 32x32w4s1 | 2.000 |" in tables and "64x16w4s1 | 1.500 |" in tables
    assert "- backward_dq D=16 S~64: 64x16w4s1 1.5000 ms (shipped 32x32w4s1: 1.33x slower)" in tables


@cpu_only
def test_json_has_the_tuner_schema(faulty_sweep) -> None:
    result, out, _ = faulty_sweep
    path = out / "tuned-Fake_GPU_80GB-triton3.9.0.json"
    assert tile_sweep.json_name(FAKE_GPU) == path.name
    data = json.loads(path.read_text())
    assert set(data) == {"format", "device", "capability", "triton", "torch", "entries"}
    assert (data["format"], data["device"], data["capability"], data["triton"]) == (1, "Fake GPU 80GB", 90, "3.9.0")
    assert data["torch"] == torch.__version__
    assert len(data["entries"]) == 3 and data["entries"] == result.entries
    for entry in data["entries"]:
        assert set(entry) == {"kernel", "head_dim", "dtype", "variant", "even_d", "seq_bucket", "config", "ms",
                              "timings_ms"}
        assert entry["kernel"] in ("forward", "backward_dkdv", "backward_dq")
        assert (entry["head_dim"], entry["dtype"], entry["variant"], entry["even_d"], entry["seq_bucket"]) == \
            (16, "bf16", "plain", True, 64)
        assert set(entry["config"]) == {"block_m", "block_n", "num_warps", "num_stages"}
        assert all(type(v) is int for v in entry["config"].values())
        label = config_label(KernelConfig(**entry["config"]))
        assert entry["timings_ms"][label] == entry["ms"] == min(entry["timings_ms"].values())
    from fused_attn import tune

    if hasattr(tune, "read_results"):  # the tuner's own reader accepts it
        assert tune.read_results(path)["entries"] == data["entries"]
    if hasattr(tune, "results_path"):  # and names its file the same, without "tuned-"
        assert tune.results_path(FAKE_GPU.name, FAKE_GPU.triton).name == path.name.removeprefix("tuned-")
    with (out / "tile_sweep.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == tile_sweep.COLUMNS and len(rows) == len(result.rows)


def test_keys_follow_the_tuner() -> None:
    assert [tile_sweep.seq_bucket(n) for n in (1, 64, 65, 4096, 4097, 8192, 10**6)] == \
        [64, 64, 128, 4096, 8192, 8192, 65536]
    assert [tile_sweep.even_head_dim(d) for d in (8, 16, 64, 80, 96, 128, 256)] == \
        [False, True, True, False, False, True, True]
    assert tile_sweep.forward_flops(Shape(4, 16, 4096, 128, False)) == 4 * 4 * 16 * 4096 * 4096 * 128
    assert tile_sweep.forward_flops(Shape(4, 16, 4096, 128, True)) == 2 * 4 * 16 * 4096 * 4096 * 128
    shapes = tile_sweep.default_shapes()
    assert {(s.head_dim, s.seq, s.causal) for s in shapes} == {(d, s, c) for d in (64, 128) for s in (4096, 8192)
                                                               for c in (False, True)}
    assert all(s.dtype == torch.bfloat16 and (s.batch, s.heads) == (4, 16) for s in shapes)
    assert [s.seq for s in shapes] == sorted(s.seq for s in shapes)  # the long ones last: a deadline cuts them
    assert {s.seq for s in tile_sweep.default_shapes(quick=True)} == {4096}


@cpu_only
def test_candidates_come_from_the_config_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    asked = []
    real = configs.candidates

    def spy(*args):
        asked.append(args)
        return real(*args)

    monkeypatch.setattr(configs, "candidates", spy)
    device = DeviceInfo("Fake GPU", 90, 232_448, "cpu", "3.9.0", torch.__version__)
    result = tile_sweep.sweep([Shape(1, 1, 64, 32, True)], device, lambda fn, what: (fn(), 1.0)[1],
                              out_dir=tmp_path, log=lambda line: None)
    assert asked == [(90, 32, 2, "plain", 232_448)]
    table = configs.candidates(90, 32, 2, "plain", 232_448)
    for kernel in tile_sweep.KERNELS:
        rows = _rows(result, kernel)
        assert [r["config"] for r in rows] == [config_label(c) for c in table[kernel]]
        assert rows[0]["shipped"] and rows[0]["status"] == "ok"
        assert all(r["status"] == "ok" for r in rows)  # every vetted tile computes the same attention


@cpu_only
def test_deadline_stops_the_sweep_cleanly(tmp_path: Path) -> None:
    clock = [0.0]
    result = tile_sweep.sweep(SHAPES, FAKE_GPU, fake_time_fn(clock=clock, step_s=1.0), out_dir=tmp_path,
                              deadline=4.5, clock=lambda: clock[0], candidates_fn=fake_candidates,
                              log=lambda line: None)
    assert result.stopped == "deadline reached"
    timed = [r for r in result.rows if r["ms"] is not None]
    assert len(timed) == 5  # three shipped kernels and the two whole calls, one fake second each
    skipped = [r for r in result.rows if r["status"] == "skipped"]
    assert all(r["reason"] in ("deadline reached", "unavailable: SDPA's cudnn_attention backend runs on CUDA only")
               for r in skipped)
    assert len(timed) + len(skipped) == len(result.rows) == 2 * len(tile_sweep._plan(SHAPES[0], TILES,
                                                                                       tile_sweep.SDPA_PROVIDERS))
    assert all(r["status"] == "skipped" for r in result.rows if r["causal"])  # the second shape never started
    # What was measured is written: the shipped tiles of the first shape are the winners so far.
    data = json.loads((tmp_path / tile_sweep.json_name(FAKE_GPU)).read_text())
    assert [(e["kernel"], e["timings_ms"]) for e in data["entries"]] == [
        ("forward", {"32x32w4s1": 3.0}), ("backward_dkdv", {"32x32w4s1": 4.0}), ("backward_dq", {"32x32w4s1": 2.0})]
    with (tmp_path / "tile_sweep.csv").open() as f:
        assert len(list(csv.DictReader(f))) == len(result.rows)
    assert "Stopped early: deadline reached" in (tmp_path / "tile_sweep.md").read_text()


def test_winners_use_complete_settings_and_never_failed_tiles() -> None:
    def row(causal, config, status, ms, shipped=False):
        return {"provider": "fused_attn", "kernel": "forward", "dtype": "bf16", "head_dim": 64, "seq": 4096,
                "causal": causal, "config": config, "status": status, "ms": ms, "shipped": shipped}

    rows = [row(False, "128x64w8s3", "ok", 2.0, True), row(False, "64x64w4s3", "ok", 1.0),
            row(False, "128x128w8s2", "check failed", 0.5), row(False, "64x32w4s2", "error", None),
            row(True, "128x64w8s3", "ok", 1.0, True), row(True, "64x64w4s3", "skipped", None),
            row(True, "128x128w8s2", "skipped", None)]
    (entry,) = tile_sweep.winners(rows)
    # causal was cut by the deadline, so the complete full-attention setting decides alone
    assert entry["config"] == {"block_m": 64, "block_n": 64, "num_warps": 4, "num_stages": 3}
    assert entry["timings_ms"] == {"128x64w8s3": 2.0, "64x64w4s3": 1.0}
    assert entry["seq_bucket"] == 4096 and entry["even_d"] is True
    only_failures = [row(False, "128x64w8s3", "check failed", 1.0, True), row(False, "64x64w4s3", "error", None)]
    assert tile_sweep.winners(only_failures) == []


def test_compare_never_passes_nan() -> None:
    ref = {name: torch.randn(2, 3) for name in tile_sweep.OUTPUT_NAMES}
    assert tile_sweep.compare(dict(ref), ref, 1e-6) == (True, {name: 0.0 for name in ref})
    off = {**ref, "dk": ref["dk"] * 1.05}
    ok, errors = tile_sweep.compare(off, ref, 2e-2)
    assert not ok and errors["dk"] == pytest.approx(0.05, rel=1e-3)
    nan = {**ref, "o": ref["o"].clone().fill_(float("nan"))}
    assert tile_sweep.compare(nan, ref, 1e30) == (False, {**{n: 0.0 for n in ref}, "o": math.inf})


@cpu_only
def test_capture_keeps_the_kernels_and_replays_one(monkeypatch: pytest.MonkeyPatch) -> None:
    originals = {name: getattr(kernels, name) for name in tile_sweep.LAUNCHED}
    before = fused_attn.interpreting()
    shape = Shape(1, 2, 48, 16, True, torch.float32)
    q, k, v, do = (torch.randn(1, 2, 48, 16) for _ in range(4))
    with tile_sweep.capture_launches() as launches:
        assert fused_attn.interpreting() == before  # isinstance checks on the kernels still answer the same
        tiles = fused_attn.AttentionConfigs(*(K(16, 16, 4, 1),) * 3)
        with fused_attn.override_configs(tiles):
            outputs = tile_sweep.forward_backward(q, k, v, do, shape)
    assert {name: getattr(kernels, name) for name in tile_sweep.LAUNCHED} == originals
    assert [launch.name for launch in launches] == list(tile_sweep.LAUNCHED)
    run = tile_sweep.Run(outputs, launches)
    expected = outputs["dq"].clone()
    outputs["dq"].fill_(float("nan"))
    run.launch_of("backward_dq")()  # the dQ kernel alone writes dq again
    torch.testing.assert_close(outputs["dq"], expected)


@cpu_only
def test_cli_without_cuda_says_so_and_exits_0(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "bench.tile_sweep", str(tmp_path / "out"), "--quick"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "tile_sweep: no CUDA device here, nothing to time (the sweep needs a GPU; exiting 0)"
    assert not (tmp_path / "out").exists()


@cpu_only
def test_cli_writes_its_files_and_prints_the_tables_last(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """main() end to end with the GPU faked: the device query and the timer are replaced."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(tile_sweep, "query_device", lambda: FAKE_GPU)
    monkeypatch.setattr(tile_sweep, "cuda_time_fn", lambda warmup_ms, rep_ms: lambda fn, what: (fn(), 2.0)[1])
    code = tile_sweep.main([str(tmp_path), "--batch", "1", "--heads", "1", "--head-dims", "16", "--seqs", "64",
                            "--deadline-s", "600"])
    out = capsys.readouterr().out
    assert code == 0
    assert out.startswith("# tile sweep on Fake GPU 80GB (capability 90)")
    assert out.rstrip().endswith("- backward_dq D=16 S~64: " + config_label(
        configs.candidates(90, 16, 2)["backward_dq"][0]) + " 2.0000 ms (= shipped)")
    assert {p.name for p in tmp_path.iterdir()} == {"tile_sweep.csv", "tile_sweep.md", tile_sweep.json_name(FAKE_GPU)}


def test_gpu_suite_fits_the_sweep_into_what_is_left() -> None:
    assert gpu_suite.sweep_step(30) == (False, True, 0.0)
    run, quick, deadline = gpu_suite.sweep_step(200)
    assert run and quick and deadline == 200 - gpu_suite.SWEEP_MARGIN_S
    run, quick, deadline = gpu_suite.sweep_step(gpu_suite.SWEEP_FULL_S + 10)
    assert run and not quick and deadline + gpu_suite.SWEEP_MARGIN_S == gpu_suite.SWEEP_FULL_S + 10


@pytest.mark.gpu
def test_tile_sweep_on_cuda(tmp_path: Path) -> None:
    """The real path on a GPU at a small size: do_bench, compiled kernels, SDPA backends, the JSON."""
    device = tile_sweep.query_device()

    def two_each(*args):  # the shipped tile and one more of each kernel: a few compiles only
        return {kernel: tiles[:2] for kernel, tiles in configs.candidates(*args).items()}

    shape = Shape(2, 4, 512, 64, True)
    result = tile_sweep.sweep([shape], device, tile_sweep.cuda_time_fn(5, 20), out_dir=tmp_path,
                              candidates_fn=two_each, log=lambda line: None)
    assert not result.stopped and not result.errors and not result.shipped_failures
    for kernel in tile_sweep.KERNELS:
        rows = _rows(result, kernel)
        assert rows and all(r["status"] == "ok" and r["ms"] > 0 and r["tflops"] > 0 for r in rows), rows
    assert {r["provider"] for r in result.rows if r["status"] == "ok"} >= {"fused_attn", "sdpa_flash"}
    data = json.loads((tmp_path / tile_sweep.json_name(device)).read_text())
    assert data["device"] == torch.cuda.get_device_name() and len(data["entries"]) == 3


@cpu_only
def test_tma_kernels_are_timed_again_with_pointer_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the kernels load through TMA (FUSED_ATTN_TMA=1 turns it on in the interpreter), each
    shipped tile is timed again with pointer loads, its outputs checked, and the ratio reported."""
    monkeypatch.setenv("FUSED_ATTN_TMA", "1")
    assert tile_sweep.tma_kernels_on("cpu", SHAPES[0]) == tile_sweep.KERNELS
    calls: list = []
    result = tile_sweep.sweep(SHAPES[:1], FAKE_GPU, fake_time_fn(calls), out_dir=tmp_path,
                              candidates_fn=fake_candidates, log=lambda line: None)
    pointer = [r for r in result.rows if r["provider"] == tile_sweep.POINTER_LOADS]
    assert [r["kernel"] for r in pointer] == list(tile_sweep.KERNELS)
    assert all(r["status"] == "ok" and r["config"] == "32x32w4s1" for r in pointer)
    assert all(r["err_o"] == 0.0 for r in pointer)  # the same numbers as the TMA run it is checked against
    assert [r["vs_shipped"] for r in pointer] == [1.0, 1.0, 1.0]  # the fake timer gives both paths one time
    timed = [what for what in calls if what.provider == tile_sweep.POINTER_LOADS]
    assert [what.kernel for what in timed] == list(tile_sweep.KERNELS)
    assert "## TMA against pointer loads" in (tmp_path / "tile_sweep.md").read_text()
    assert os.environ["FUSED_ATTN_TMA"] == "1"  # the sweep's FUSED_ATTN_TMA=0 was undone
    monkeypatch.delenv("FUSED_ATTN_TMA")
    assert tile_sweep.tma_kernels_on("cpu", SHAPES[0]) == ()  # the interpreter's default: no rows added
