"""Which tile a GPU gets: the table's rows per card, the nearest row for cards it does not know,
the retry with a smaller tile when a launch runs out of resources, and bf16 refused on Turing.

No GPU is needed: the device queries are replaced by fakes (the launch paths that need a real
GPU run in tests/test_gpu.py)."""
from __future__ import annotations

import types
import warnings

import pytest
import torch
from triton.runtime.errors import OutOfResources

from fused_attn import _launch
from fused_attn.kernels import configs
from fused_attn.kernels.configs import KernelConfig


@pytest.mark.parametrize("capability, shared, row", [
    (75, 65_536, 75),     # T4
    (80, 166_912, 80),    # A100
    (86, 101_376, 86),    # RTX 3090, A10
    (89, 101_376, 86),    # RTX 4090, L4, L40S: same ISA and shared memory as sm_86
    (87, 166_912, 86),    # Jetson Orin: the newest row not newer than the card that fits
    (90, 232_448, 90),    # H100 / H200
    (100, 232_448, 100),  # B200
    (103, 232_448, 100),  # B300
    (120, 101_376, 120),  # RTX 5090
    (121, 101_376, 120),  # DGX Spark
    (90, 101_376, 86),    # a card with less shared memory than its row assumes: the row that fits
    (70, 98_304, 75),     # older than every row: the oldest
    (130, 101_376, 120),  # a future card: the newest row that fits it
])
def test_table_row_for_each_card(capability: int, shared: int, row: int) -> None:
    assert configs.table_capability(capability, shared) == row


def test_every_row_is_in_the_table_with_tiles_that_fit_it() -> None:
    """Every (target, head-dim bucket, element size, variant) has tiles for the three kernels,
    and each tile's blocks are powers of two >= 16 (what the launcher and tl.dot need)."""
    table = configs.all_candidates()
    expected = {(cap, d, size, variant) for cap in configs.CAPABILITIES for d in configs.HEAD_DIM_BUCKETS
                for size in configs.ELEMENT_SIZES for variant in configs.VARIANTS}
    assert set(table) == expected
    for key, by_kernel in table.items():
        assert set(by_kernel) == set(configs.KERNELS), key
        for kernel, tiles in by_kernel.items():
            assert tiles and len(set(tiles)) == len(tiles), (key, kernel)
            for tile in tiles:
                for block in (tile.block_m, tile.block_n):
                    assert block >= 16 and block & (block - 1) == 0, (key, kernel, tile)


@pytest.mark.parametrize("has_mask, has_dropout, key", [
    (False, False, "plain"), (True, False, "mask"), (False, True, "dropout"), (True, True, "all")])
def test_variant_key(has_mask: bool, has_dropout: bool, key: str) -> None:
    assert configs.variant_key(has_mask, has_dropout) == key


def test_lookup_is_the_first_candidate_and_rejects_unknown_variants() -> None:
    by_kernel = configs.candidates(90, 128, 2, "mask")
    chosen = configs.lookup(90, 128, 2, "mask")
    assert (chosen.forward, chosen.backward_dkdv, chosen.backward_dq) == tuple(
        by_kernel[k][0] for k in configs.KERNELS)
    # Head dims map to their buckets, and sm_89 shares sm_86's row.
    assert configs.lookup(89, 80, 2) == configs.lookup(86, 128, 2)
    with pytest.raises(ValueError, match="variant must be one of"):
        configs.candidates(90, 128, 2, "windowed")


@pytest.fixture
def fake_gpu(monkeypatch: pytest.MonkeyPatch):
    """The launcher believes it runs compiled kernels on a GPU of the given capability."""
    def install(capability: int, shared: int) -> None:
        monkeypatch.setattr(_launch, "interpreting", lambda: False)
        monkeypatch.setattr(_launch, "device_row",
                            lambda index: (capability, shared, configs.table_capability(capability, shared)))
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(_launch, "_WARNED", set())
        monkeypatch.setattr(_launch, "_OUT_OF_RESOURCES", set())
    return install


def test_launcher_takes_the_table_row_of_the_card(fake_gpu) -> None:
    fake_gpu(89, 101_376)
    q = torch.empty(1, 1, 4, 80, dtype=torch.float16)
    got = _launch._kernel_candidates("backward_dkdv", q, 80, 80, "plain", 4096, 4096)
    assert got == configs.candidates(86, 128, 2, "plain")["backward_dkdv"]
    got = _launch._kernel_candidates("forward", q.float(), 80, 80, "all", 4096, 4096)
    assert got == configs.candidates(86, 128, 4, "all")["forward"]


def test_out_of_resources_retries_with_the_next_tile_and_remembers(fake_gpu) -> None:
    fake_gpu(120, 101_376)
    q = torch.empty(1, 1, 4, 64, dtype=torch.float16)
    big, small = KernelConfig(128, 128, 8, 3), KernelConfig(64, 64, 4, 2)
    launched: list[KernelConfig] = []

    def launch(cfg: KernelConfig) -> None:
        launched.append(cfg)
        if cfg == big:
            raise OutOfResources(200_000, 101_376, "shared memory")

    with pytest.warns(RuntimeWarning, match="next smaller vetted tile"):
        _launch._launch_tiled("forward", (big, small), q, launch)
    assert launched == [big, small]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once: the second call neither warns nor tries the big tile
        _launch._launch_tiled("forward", (big, small), q, launch)
    assert launched == [big, small, small]


def test_out_of_resources_on_every_tile_raises(fake_gpu) -> None:
    fake_gpu(120, 101_376)
    q = torch.empty(1, 1, 4, 64, dtype=torch.float16)

    def launch(cfg: KernelConfig) -> None:
        raise OutOfResources(300_000, 101_376, "shared memory")

    with pytest.warns(RuntimeWarning), pytest.raises(OutOfResources):
        _launch._launch_tiled("forward", (KernelConfig(64, 64, 4, 2), KernelConfig(32, 32, 4, 1)), q, launch)


def _cuda_like(dtype: torch.dtype) -> types.SimpleNamespace:
    return types.SimpleNamespace(device=torch.device("cuda", 0), dtype=dtype)


def test_bf16_is_refused_on_turing_before_any_launch(fake_gpu) -> None:
    fake_gpu(75, 65_536)
    with pytest.raises(ValueError, match=r"q has dtype torch.bfloat16.*capability 7.5.*float16"):
        _launch.check_dtype_on_device(_cuda_like(torch.bfloat16))


def test_turing_warns_once_that_it_has_no_tensor_cores(fake_gpu) -> None:
    fake_gpu(75, 65_536)
    with pytest.warns(RuntimeWarning, match="without tensor cores"):
        _launch.check_dtype_on_device(_cuda_like(torch.float16))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _launch.check_dtype_on_device(_cuda_like(torch.float32))


def test_ampere_and_newer_take_bf16_silently(fake_gpu) -> None:
    for capability, shared in ((80, 166_912), (90, 232_448), (120, 101_376)):
        fake_gpu(capability, shared)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            _launch.check_dtype_on_device(_cuda_like(torch.bfloat16))
