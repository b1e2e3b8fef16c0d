"""Bad input raises a ValueError or TypeError that names the argument, before any launch."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from typing import Callable

import pytest
import torch

import fused_attn


def _qkv(device: str, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    return {
        "q": torch.randn(2, 4, 8, 16, device=device, dtype=dtype),
        "k": torch.randn(2, 2, 8, 16, device=device, dtype=dtype),
        "v": torch.randn(2, 2, 8, 16, device=device, dtype=dtype),
    }


def _replace(name: str, make: Callable[[dict[str, torch.Tensor]], object]):
    def apply(args: dict[str, torch.Tensor]) -> dict[str, object]:
        out: dict[str, object] = dict(args)
        out[name] = make(args)
        return out
    return apply


BAD_INPUTS = [
    ("q-rank", _replace("q", lambda a: a["q"][0]), ValueError, "q must have 4 dimensions"),
    ("k-not-tensor", _replace("k", lambda a: a["k"].tolist()), TypeError, "k must be a torch.Tensor"),
    ("v-dtype-int", _replace("v", lambda a: a["v"].to(torch.int32)), TypeError, "v has dtype int32"),
    ("q-float64", _replace("q", lambda a: a["q"].double()), TypeError, "q has dtype float64"),
    ("mixed-dtypes", _replace("k", lambda a: a["k"].float()), TypeError, "share one dtype"),
    ("batch-mismatch", _replace("k", lambda a: a["k"][:1]), ValueError, "batch size 2"),
    ("kv-heads-mismatch", _replace("v", lambda a: a["v"][:, :1]), ValueError, "v must have as many heads as k"),
    ("kv-seq-mismatch", _replace("v", lambda a: a["v"][:, :, :5]), ValueError, "sequence length of k"),
    ("head-dim-mismatch", _replace("k", lambda a: a["k"][..., :8]), ValueError, "k must have head_dim 16"),
    ("gqa-not-multiple", lambda a: {**a, "k": a["k"][:, :1].expand(2, 3, 8, 16), "v": a["v"][:, :1].expand(2, 3, 8, 16)},
     ValueError, "multiple of k's and v's heads"),
    ("head-dim-too-big", lambda a: {n: torch.randn(1, 1, 4, 513, dtype=t.dtype, device=t.device) for n, t in a.items()},
     ValueError, "between 1 and 512"),
    ("v-head-dim-too-big", _replace("v", lambda a: torch.randn(2, 2, 8, 600, dtype=a["v"].dtype, device=a["v"].device)),
     ValueError, "v head_dim must be between 1 and 512"),
    ("q-non-unit-stride", _replace("q", lambda a: torch.randn(2, 4, 8, 32, dtype=a["q"].dtype, device=a["q"].device)[..., ::2]), ValueError, "q must have a unit stride"),
    ("scale-string", lambda a: {**a, "scale": "0.1"}, TypeError, "scale must be a float"),
    ("scale-nan", lambda a: {**a, "scale": float("nan")}, ValueError, "scale must be finite"),
    ("causal-not-bool", lambda a: {**a, "causal": 1}, TypeError, "causal must be a bool"),
    ("return-lse-not-bool", lambda a: {**a, "return_lse": "yes"}, TypeError, "return_lse must be a bool"),
]


@pytest.mark.parametrize("name,mutate,error,message", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_raises_clear_error(name, mutate, error, message, device: str, monkeypatch) -> None:
    # Any launch at all would be a bug: replace the launcher with one that fails the test.
    def no_launch(*args, **kwargs):
        raise AssertionError("a kernel was launched for invalid input")

    monkeypatch.setattr("fused_attn._function.attention_forward", no_launch)
    kwargs = mutate(_qkv(device))
    with pytest.raises(error, match=message):
        fused_attn.attention(**kwargs)


def test_mixed_devices_rejected() -> None:
    args = _qkv("cpu")
    args["k"] = args["k"].to("meta")
    with pytest.raises(ValueError, match="one device"):
        fused_attn.attention(**args)


def test_unsupported_device_rejected() -> None:
    args = {n: t.to("meta") for n, t in _qkv("cpu").items()}
    with pytest.raises(ValueError, match="device type 'meta'"):
        fused_attn.attention(**args)


def test_reference_validates_too() -> None:
    with pytest.raises(ValueError, match="multiple of k's and v's heads"):
        fused_attn.reference.attention(torch.randn(1, 3, 4, 8), torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8))


@pytest.mark.cpu_only(reason="checks the CPU path without the interpreter")
def test_cpu_without_interpreter_says_how_to_enable_it() -> None:
    script = textwrap.dedent("""
        import torch, fused_attn
        q = torch.randn(1, 1, 4, 16)
        try:
            fused_attn.attention(q, q, q)
        except ValueError as e:
            print("ERROR:", e)
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "ERROR:" in result.stdout and "TRITON_INTERPRET=1" in result.stdout


def _forbid_launch(monkeypatch) -> None:
    def no_launch(*args, **kwargs):
        raise AssertionError("a kernel was launched for invalid input")

    monkeypatch.setattr("fused_attn._function.attention_forward", no_launch)
    monkeypatch.setattr("fused_attn._launch.dropout_mask", no_launch)


@pytest.mark.parametrize("softcap,scale", [(1e-40, None), (1e-39, 1.0), (3e38, None), (1e-3, 1e36)])
def test_softcap_out_of_float32_range_is_refused(softcap: float, scale: float | None, device: str,
                                                 monkeypatch) -> None:
    # scale / softcap or softcap * log2(e) would overflow float32 (or flush to 0) inside the kernels.
    _forbid_launch(monkeypatch)
    with pytest.raises(ValueError, match="softcap=.* out of float32 range"):
        fused_attn.attention(**_qkv(device), softcap=softcap, scale=scale)


def test_scale_out_of_float32_range_is_refused(device: str, monkeypatch) -> None:
    _forbid_launch(monkeypatch)
    with pytest.raises(ValueError, match="scale must be at most"):
        fused_attn.attention(**_qkv(device), scale=3e38)


@pytest.mark.parametrize("window", [(2**63, 0), (2**31, 2**70), (10**30, -1)])
def test_window_sides_past_int64_run_unbounded(window: tuple[int, int], device: str) -> None:
    args = _qkv(device, torch.float32)
    o = fused_attn.attention(**args, window=window)
    unbounded = fused_attn.attention(**args, window=tuple(-1 if side > 2**40 else side for side in window))
    assert torch.equal(o, unbounded)
    gold = fused_attn.reference.attention(*(args[n].double() for n in "qkv"), window=window)
    torch.testing.assert_close(o.double(), gold, atol=1e-5, rtol=1e-5)


def _configs(**forward_fields) -> fused_attn.AttentionConfigs:
    ok = fused_attn.KernelConfig(block_m=32, block_n=32, num_warps=4, num_stages=1)
    forward = fused_attn.KernelConfig(**{"block_m": 32, "block_n": 32, "num_warps": 4, "num_stages": 1,
                                         **forward_fields})
    return fused_attn.AttentionConfigs(forward=forward, backward_dkdv=ok, backward_dq=ok)


BAD_CONFIGS = [
    ("negative-block", lambda: _configs(block_m=-32), ValueError, r"configs.forward.block_m must be a power of two"),
    ("zero-block", lambda: _configs(block_n=0), ValueError, r"configs.forward.block_n must be a power of two"),
    ("non-power-of-two", lambda: _configs(block_m=48), ValueError, "power of two >= 16, got 48"),
    ("below-16", lambda: _configs(block_n=8), ValueError, "power of two >= 16, got 8"),
    ("float-block", lambda: _configs(block_m=32.0), TypeError, r"configs.forward.block_m must be an int"),
    ("warps", lambda: _configs(num_warps=3), ValueError, "num_warps must be a power of two"),
    ("stages", lambda: _configs(num_stages=0), ValueError, "num_stages must be >= 1"),
    ("dict", lambda: {"forward": (32, 32, 4, 1)}, TypeError, "configs must be a fused_attn.AttentionConfigs"),
    ("tuple-member", lambda: fused_attn.AttentionConfigs((32, 32, 4, 1), None, None), TypeError,
     "configs.forward must be a fused_attn.KernelConfig"),
]


@pytest.mark.parametrize("name,make,error,message", BAD_CONFIGS, ids=[b[0] for b in BAD_CONFIGS])
def test_override_configs_refuses_bad_configs(name, make, error, message, monkeypatch) -> None:
    _forbid_launch(monkeypatch)
    with pytest.raises(error, match=message):
        with fused_attn.override_configs(make()):
            pass


BAD_DROPOUT_MASK = [
    ("batch-negative", {"batch": -1}, ValueError, "batch must be >= 0"),
    ("seq-q-float", {"seq_q": 2.5}, TypeError, "seq_q must be an int"),
    ("heads-bool", {"heads": True}, TypeError, "heads must be an int"),
    ("seed-string", {"seed": "abc"}, TypeError, "seed must be an int"),
    ("seed-float-tensor", {"seed": torch.tensor(1.5)}, TypeError, "seed must be an int"),
    ("seed-too-big", {"seed": 2**64}, ValueError, "seed must fit in int64"),
    ("device-garbage", {"device": "gpu0"}, ValueError, "device must name a torch device"),
    ("device-int-list", {"device": [0]}, TypeError, "device must be a torch.device"),
]


@pytest.mark.parametrize("name,changes,error,message", BAD_DROPOUT_MASK, ids=[b[0] for b in BAD_DROPOUT_MASK])
def test_dropout_mask_refuses_bad_arguments(name, changes, error, message, device: str, monkeypatch) -> None:
    _forbid_launch(monkeypatch)
    args = {"seed": 0, "batch": 1, "heads": 2, "seq_q": 3, "seq_k": 4, "dropout_p": 0.1, "device": device, **changes}
    with pytest.raises(error, match=message):
        fused_attn.dropout_mask(**args)
