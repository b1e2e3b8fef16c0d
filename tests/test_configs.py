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
                for size in configs.ELEMENT_SIZES for variant in configs.VARIANTS
                if (variant == "plain" or configs.has_variant_rows(cap, d, size)) and d <= configs.max_head_dim(cap, size)}
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
        _launch._launch_tiled("forward", (big, small), q, launch, (128, 128, True))
    assert launched == [big, small]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once: the second call neither warns nor tries the big tile
        _launch._launch_tiled("forward", (big, small), q, launch, (128, 128, True))
    assert launched == [big, small, small]
    # Another specialization (head dim, flags) needs other resources: it tries the big tile again.
    _launch._launch_tiled("forward", (big, small), q, lambda cfg: launched.append(cfg), (64, 64, True))
    assert launched[-1] == big


def test_out_of_resources_on_every_tile_raises(fake_gpu) -> None:
    fake_gpu(120, 101_376)
    q = torch.empty(1, 1, 4, 64, dtype=torch.float16)

    def launch(cfg: KernelConfig) -> None:
        raise OutOfResources(300_000, 101_376, "shared memory")

    with pytest.warns(RuntimeWarning), pytest.raises(OutOfResources):
        _launch._launch_tiled("forward", (KernelConfig(64, 64, 4, 2), KernelConfig(32, 32, 4, 1)), q, launch, ())


def _cuda_like(dtype: torch.dtype) -> types.SimpleNamespace:
    size = torch.empty((), dtype=dtype).element_size()
    return types.SimpleNamespace(device=torch.device("cuda", 0), dtype=dtype, element_size=lambda: size)


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


def test_launcher_reads_the_row_of_the_card_not_another(fake_gpu, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows tagged by their capability (in num_stages): each card launches its own row's tile."""
    tagged = {key: tuple(((16, 16, 4, key[0]),) for _ in configs.KERNELS) for key in configs.PICKED}
    monkeypatch.setattr(configs, "PICKED", tagged)
    q = torch.empty(1, 1, 4, 64, dtype=torch.float16)
    for capability, shared, row in ((89, 101_376, 86), (121, 101_376, 120), (90, 232_448, 90), (75, 65_536, 75)):
        fake_gpu(capability, shared)
        cfg = _launch._kernel_candidates("backward_dq", q, 64, 64, "plain", 128, 128)[0]
        assert cfg.num_stages == row, (capability, cfg)


def test_device_row_reads_capability_and_shared_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: (8, 9))
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda index: types.SimpleNamespace(shared_memory_per_block_optin=101_376))
    assert _launch.device_row.__wrapped__(0) == (89, 101_376, 86)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda index: types.SimpleNamespace(shared_memory_per_block_optin=232_448))
    assert _launch.device_row.__wrapped__(0) == (90, 232_448, 90)


def test_check_device_refuses_bf16_on_turing(fake_gpu) -> None:
    """The public entry points call check_device first: on sm_75 it refuses bf16 before a launch."""
    fake_gpu(75, 65_536)
    with pytest.raises(ValueError, match="bfloat16"):
        _launch.check_device(_cuda_like(torch.bfloat16))
    assert "bf16 on a GPU of capability 7.5" in _launch.device_fallback_reason(_cuda_like(torch.bfloat16))
    assert _launch.device_fallback_reason(_cuda_like(torch.float16)) is None


def test_drop_in_wrappers_fall_back_for_what_the_card_cannot_compute(monkeypatch: pytest.MonkeyPatch) -> None:
    """sdpa, nn.MultiheadAttention, the SDPA-flash registry and Hugging Face hand bf16-on-Turing
    calls to torch (their contract) instead of raising: each asks _checks.unsupported_reason,
    which asks device_fallback_reason."""
    from fused_attn import _checks, hf, nn, registry, sdpa

    monkeypatch.setattr(_checks, "device_fallback_reason", lambda q, head_dim=0: "the card cannot")
    q = torch.randn(1, 2, 4, 16)
    assert sdpa._fallback_reason(q, q, q, 0.0) == "the card cannot"
    assert registry._unsupported(q, q, q, False) == "the card cannot"
    mha = nn.MultiheadAttention(32, 2, batch_first=True)
    assert mha._why_not_fused(q, q, None, False, None, False) == "the card cannot"
    assert hf._fallback_reason(torch.nn.Module(), q, 0.0, False, {}) == "the card cannot"


@pytest.mark.parametrize("capability, shared, dtype, limit", [
    (75, 65_536, torch.float16, 256), (75, 65_536, torch.float32, 256), (86, 101_376, torch.float32, 256),
    (120, 101_376, torch.float32, 256), (86, 101_376, torch.bfloat16, 512), (80, 166_912, torch.float32, 512),
    (90, 232_448, torch.bfloat16, 512), (100, 232_448, torch.float32, 512)])
def test_head_dims_over_256_need_a_card_whose_shared_memory_holds_their_tiles(
        fake_gpu, capability: int, shared: int, dtype: torch.dtype, limit: int) -> None:
    """Head dim 512's backward needs 96 KB (fp16) or 128 KB (fp32) of shared memory at 16 x 16:
    `attention` refuses it before a launch on cards that have less, the drop-in wrappers fall back,
    and the table has no such row."""
    fake_gpu(capability, shared)
    q = _cuda_like(dtype)
    size = q.element_size()
    assert configs.max_head_dim(configs.table_capability(capability, shared), size) == limit
    assert _launch.device_fallback_reason(q, limit) is None or dtype == torch.bfloat16 and capability < 80
    if limit < 512:
        assert "at most 256" in _launch.device_fallback_reason(q, 257)
        with pytest.raises(ValueError, match=r"q, k, v: a head dim of 300 .*at most 256"):
            _launch.check_device(q, 300)
        assert (configs.table_capability(capability, shared), 512, size, "plain") not in configs.PICKED
    else:
        _launch.check_device(q, 512)
        assert (configs.table_capability(capability, shared), 512, size, "plain") in configs.PICKED


def test_fp32_turing_and_small_head_dims_run_the_plain_tiles_for_variants() -> None:
    assert not configs.has_variant_rows(90, 64, 4) and not configs.has_variant_rows(75, 64, 2)
    assert not configs.has_variant_rows(90, 32, 2)
    assert configs.has_variant_rows(90, 64, 2) and configs.has_variant_rows(120, 256, 2)
    for capability, d, size in ((90, 64, 4), (75, 64, 2), (75, 64, 4), (90, 32, 2)):
        assert configs.candidates(capability, d, size, "all") == configs.candidates(capability, d, size, "plain")
