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
    ("head-dim-too-big", lambda a: {n: torch.randn(1, 1, 4, 257, dtype=t.dtype, device=t.device) for n, t in a.items()},
     ValueError, "between 1 and 256"),
    ("v-head-dim-too-big", _replace("v", lambda a: torch.randn(2, 2, 8, 300, dtype=a["v"].dtype, device=a["v"].device)),
     ValueError, "v head_dim must be between 1 and 256"),
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


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU path without the interpreter")
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
