"""fused_attn.scaled_dot_product_attention against torch's, over a randomized grid of arguments
and mask shapes, held to FlashAttention's rule against float64 (torch's SDPA in the same dtype is
the "plain PyTorch" error); dropout runs in the kernels and matches the reference given the
kernels' own mask."""
from __future__ import annotations

import random
import warnings

import pytest
import torch
import torch.nn.functional as F

import fused_attn
from fused_attn import reference
from tests.helpers import assert_close_to_reference


def _random_cases(count: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    cases = []
    for _ in range(count):
        heads_kv = rng.choice([1, 2, 3])
        group = rng.choice([1, 1, 2, 4])
        seq_q = rng.choice([1, 17, 40, 97])
        cases.append({
            "lead": rng.choice([(2,), (1,), (2, 2)]),
            "heads_q": heads_kv * group, "heads_kv": heads_kv, "enable_gqa": group > 1 or rng.random() < 0.3,
            "seq_q": seq_q, "seq_k": seq_q if rng.random() < 0.5 else rng.choice([1, 33, 80]),
            "head_dim": rng.choice([16, 40, 64, 80]), "head_dim_v": None,
            "is_causal": rng.random() < 0.5, "scale_factor": rng.choice([None, 0.5, 2.0]),
            "dtype": rng.choice([torch.float16, torch.bfloat16, torch.float32]),
        })
        if cases[-1]["is_causal"]:
            cases[-1]["seq_k"] = seq_q  # L != S causal is a fallback case, tested below
        cases[-1]["head_dim_v"] = rng.choice([cases[-1]["head_dim"], 24])
        mask = rng.choice([None, None, "bool-LS", "bool-batch", "float-HLS", "float-full"])
        cases[-1]["mask"] = None if cases[-1]["is_causal"] else mask  # torch refuses a mask with is_causal
        # A scale relative to 1/sqrt(E), so random N(0, 1) inputs give scores of realistic size.
        factor = cases[-1].pop("scale_factor")
        cases[-1]["scale"] = None if factor is None else factor / cases[-1]["head_dim"] ** 0.5
    return cases


CASES = _random_cases(18) + [  # fixed corner: 3-D inputs
    {"lead": (), "heads_q": 3, "heads_kv": 3, "enable_gqa": False, "seq_q": 21, "seq_k": 21, "head_dim": 32,
     "head_dim_v": 32, "is_causal": True, "scale": None, "dtype": torch.float32, "three_d": True},
    {"lead": (1,), "heads_q": 2, "heads_kv": 2, "enable_gqa": False, "seq_q": 1, "seq_k": 1, "head_dim": 80,
     "head_dim_v": 80, "is_causal": False, "scale": 1.0, "dtype": torch.float32},  # one key: dq is exactly 0
]


def _case_id(c: dict) -> str:
    return (f"{c.get('mask') or 'nomask'}-"f"{'x'.join(map(str, c['lead']))}-h{c['heads_q']}:{c['heads_kv']}-L{c['seq_q']}-S{c['seq_k']}-"
            f"E{c['head_dim']}:{c['head_dim_v']}-{'causal' if c['is_causal'] else 'full'}-"
            f"s{'default' if c['scale'] is None else round(c['scale'], 3)}-"
            f"{str(c['dtype'])[6:]}{'-3d' if c.get('three_d') else ''}")


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_matches_torch_sdpa(case: dict, device: str) -> None:
    gen = torch.Generator().manual_seed(1)
    if case.get("three_d"):
        shapes = [(case["heads_q"], case["seq_q"], case["head_dim"]), (case["heads_q"], case["seq_k"], case["head_dim"]),
                  (case["heads_q"], case["seq_k"], case["head_dim_v"]), (case["heads_q"], case["seq_q"], case["head_dim_v"])]
    else:
        lead = case["lead"]
        shapes = [(*lead, case["heads_q"], case["seq_q"], case["head_dim"]),
                  (*lead, case["heads_kv"], case["seq_k"], case["head_dim"]),
                  (*lead, case["heads_kv"], case["seq_k"], case["head_dim_v"]),
                  (*lead, case["heads_q"], case["seq_q"], case["head_dim_v"])]
    q, k, v, do = (torch.randn(s, generator=gen).to(device=device, dtype=case["dtype"]) for s in shapes)
    kwargs = {"is_causal": case["is_causal"], "scale": case["scale"], "enable_gqa": case["enable_gqa"]}
    mask = case.get("mask")
    if mask is not None:
        seq_q, seq_k, lead = case["seq_q"], case["seq_k"], case["lead"]
        mask_shape = {"LS": (seq_q, seq_k), "batch": (*lead, 1, seq_q, seq_k),
                      "HLS": (case["heads_q"], seq_q, seq_k), "full": (*lead, case["heads_q"], seq_q, seq_k)}[
                          mask.split("-")[1]]
        if mask.startswith("bool"):
            keep = torch.rand(mask_shape, generator=gen) > 0.4
            keep[..., 0] = True  # torch gives NaN for a row with no key (fused_attn gives 0): keep one
            kwargs["attn_mask"] = keep.to(device)
        else:
            kwargs["attn_mask"] = torch.randn(mask_shape, generator=gen).to(device=device, dtype=case["dtype"])
    results = {}
    for name, fn, dtype in (("fused", fused_attn.scaled_dot_product_attention, case["dtype"]),
                            ("plain", F.scaled_dot_product_attention, case["dtype"]),
                            ("golden", F.scaled_dot_product_attention, torch.float64)):
        leaves = [t.to(dtype, copy=True).requires_grad_() for t in (q, k, v)]
        call_kwargs = dict(kwargs)
        if mask is not None and mask.startswith("float"):  # torch wants a float mask in q's dtype
            call_kwargs["attn_mask"] = kwargs["attn_mask"].to(dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("error" if name == "fused" else "default")  # no fallback here
            out = fn(*leaves, **call_kwargs)
        out.backward(do.to(dtype))
        results[name] = [out.detach()] + [t.grad for t in leaves]
    # Every gradient goes through dP - delta, two sums of size |dO| |V|: with one key both are
    # equal and dq is exactly 0 in torch's formula but rounding-sized in a recomputing kernel.
    gradient_scale = do.abs().max().item() * v.abs().max().item()
    for i, name in enumerate(("o", "dq", "dk", "dv")):
        assert_close_to_reference(name, results["fused"][i], results["golden"][i], results["plain"][i],
                                  2 if i == 0 else 3, case["dtype"], None if i == 0 else gradient_scale)


@pytest.mark.parametrize("mask_kind", ["bool", "float", "float-grad", "causal-L<S", "causal-L>S"])
def test_masks_and_top_left_causal_match_torch(mask_kind: str, device: str) -> None:
    """Masks run in the kernels (no fallback); torch's top-left is_causal with L != S too."""
    gen = torch.Generator().manual_seed(2)
    seq_q, seq_k = {"causal-L<S": (13, 29), "causal-L>S": (29, 13)}.get(mask_kind, (21, 34))
    q = torch.randn(2, 4, seq_q, 32, generator=gen).to(device)
    k, v = (torch.randn(2, 2, seq_k, 32, generator=gen).to(device) for _ in range(2))
    do = torch.randn(2, 4, seq_q, 32, generator=gen).to(device)
    mask = None
    if mask_kind == "bool":
        mask = (torch.rand(2, 1, seq_q, seq_k, generator=gen) > 0.3).to(device)
        mask[..., 0] = True  # torch's math backend gives NaN for a row with no key; keep one
    elif mask_kind.startswith("float"):
        mask = torch.randn(4, seq_q, seq_k, generator=gen).to(device)
    results = {}
    for name, fn, dtype in (("fused", fused_attn.scaled_dot_product_attention, torch.float32),
                            ("plain", F.scaled_dot_product_attention, torch.float32),
                            ("golden", F.scaled_dot_product_attention, torch.float64)):
        leaves = [t.to(dtype, copy=True).requires_grad_() for t in (q, k, v)]
        m = None if mask is None else mask if mask.dtype == torch.bool else mask.to(dtype, copy=True)
        if mask_kind == "float-grad":
            m.requires_grad_()
        with warnings.catch_warnings():
            warnings.simplefilter("error" if name == "fused" else "default")
            out = fn(*leaves, attn_mask=m, is_causal=mask_kind.startswith("causal"), enable_gqa=True)
        out.backward(do.to(dtype))
        results[name] = [out.detach()] + [t.grad for t in leaves] + ([m.grad] if mask_kind == "float-grad" else [])
    for i, name in enumerate(["o", "dq", "dk", "dv", "dmask"][:len(results["fused"])]):
        assert_close_to_reference(name, results["fused"][i], results["golden"][i], results["plain"][i],
                                  2 if i == 0 else 3, torch.float32)


def test_a_row_with_no_key_gives_zeros_not_nan(device: str) -> None:
    q, k, v = (torch.randn(1, 2, 5, 16, device=device) for _ in range(3))
    mask = torch.ones(5, 5, dtype=torch.bool, device=device)
    mask[2] = False
    out = fused_attn.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert torch.equal(out[:, :, 2], torch.zeros_like(out[:, :, 2]))
    assert not out.isnan().any()


DROPOUT_CASES = [  # (leading dims or None for 3-D input, Hq, Hkv, L, S, mask, dtype, dropout_p)
    ((2,), 4, 2, 13, 21, "causal", torch.float16, 0.3),          # GQA, top-left causal with L != S (a mask)
    ((2, 2), 2, 2, 17, 17, "float", torch.bfloat16, 0.5),         # two leading dims flattened into the batch
    (None, 1, 1, 9, 24, None, torch.float32, 0.2),                # 3-D (N, L, E): one head
]


@pytest.mark.parametrize("lead,heads_q,heads_kv,seq_q,seq_k,mask_kind,dtype,dropout_p", DROPOUT_CASES,
                         ids=["gqa-causal-fp16", "lead2x2-floatmask-bf16", "3d-fp32"])
def test_dropout_runs_in_the_kernels_and_matches_the_reference(lead, heads_q, heads_kv, seq_q, seq_k, mask_kind,
                                                               dtype, dropout_p, device) -> None:
    """dropout_p > 0 is applied (as torch does, with no training flag) with a seed from torch's
    default generator: re-seeding and `fused_attn.dropout_seed()` give the kernels' mask for the
    flattened (batch, heads) shape, and the reference with that mask matches o and the gradients."""
    gen = torch.Generator().manual_seed(3)
    if lead is None:
        shapes = [(2, seq_q, 32), (2, seq_k, 32), (2, seq_k, 24), (2, seq_q, 24)]
    else:
        shapes = [(*lead, heads_q, seq_q, 32), (*lead, heads_kv, seq_k, 32), (*lead, heads_kv, seq_k, 24),
                  (*lead, heads_q, seq_q, 24)]
    q, k, v, do = (torch.randn(s, generator=gen).to(device=device, dtype=dtype) for s in shapes)
    mask = torch.randn(heads_q, seq_q, seq_k, generator=gen).to(device=device, dtype=dtype) if mask_kind == "float" \
        else None
    kwargs = {"attn_mask": mask, "dropout_p": dropout_p, "is_causal": mask_kind == "causal", "enable_gqa": True}
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    torch.manual_seed(7)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback
        out = fused_attn.scaled_dot_product_attention(*leaves, **kwargs)
    out.backward(do)
    torch.manual_seed(7)
    assert torch.equal(fused_attn.scaled_dot_product_attention(q, k, v, **kwargs), out.detach())  # repeatable
    assert not torch.equal(fused_attn.scaled_dot_product_attention(q, k, v, **kwargs), out.detach())  # new seed

    # The kernels see (batch, heads, L, S) with the leading dims flattened (3-D input: one head).
    def as_kernel_sees(t: torch.Tensor) -> torch.Tensor:
        return t.unsqueeze(1) if lead is None else t.reshape(-1, *t.shape[-3:])

    torch.manual_seed(7)
    batch = as_kernel_sees(q).shape[0]
    keep = fused_attn.dropout_mask(fused_attn.dropout_seed(), batch, heads_q, seq_q, seq_k, dropout_p, device)
    assert 0.3 < (~keep).float().mean().item() / dropout_p < 1.7  # about dropout_p of the weights dropped
    visible = torch.ones(seq_q, seq_k, dtype=torch.bool, device=device).tril() if mask_kind == "causal" else None
    expected = {}
    for name, ref_dtype in (("golden", torch.float64), ("plain", dtype)):
        ref_leaves = [as_kernel_sees(t).to(ref_dtype).requires_grad_() for t in (q, k, v)]
        ref_mask = visible if mask is None else mask.to(ref_dtype)
        ref_out = reference.attention(*ref_leaves, attn_mask=ref_mask, dropout_p=dropout_p, dropout_mask=keep)
        ref_out.backward(as_kernel_sees(do).to(ref_dtype))
        expected[name] = [ref_out.detach()] + [t.grad for t in ref_leaves]
    gradient_scale = do.abs().max().item() * v.abs().max().item() / (1 - dropout_p)
    for i, (name, got) in enumerate(zip(("o", "dq", "dk", "dv"), [out.detach()] + [t.grad for t in leaves])):
        assert_close_to_reference(name, as_kernel_sees(got), expected["golden"][i], expected["plain"][i],
                                  2 if i == 0 else 3, dtype, None if i == 0 else gradient_scale)


def test_dropout_p_of_one_falls_back_to_torchs_zeros() -> None:
    q = torch.randn(1, 2, 5, 16)
    fused_attn.sdpa._WARNED.clear()
    with pytest.warns(UserWarning, match="dropout_p=1"):
        out = fused_attn.scaled_dot_product_attention(q, q, q, dropout_p=1.0)
    assert torch.equal(out, torch.zeros_like(out))


def test_mask_and_is_causal_together_are_refused_as_in_torch() -> None:
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(ValueError, match="either attn_mask or is_causal"):
        fused_attn.scaled_dot_product_attention(q, q, q, attn_mask=torch.ones(4, 4, dtype=torch.bool), is_causal=True)


def test_gqa_needs_enable_gqa_as_in_torch() -> None:
    q, k = torch.randn(1, 4, 5, 16), torch.randn(1, 2, 5, 16)
    with pytest.raises(ValueError, match="enable_gqa"):
        fused_attn.scaled_dot_product_attention(q, k, k)
    with pytest.raises(ValueError, match="same number of dimensions"):
        fused_attn.scaled_dot_product_attention(q, k[0], k[0])


def test_a_value_head_dim_over_512_falls_back_to_torch(monkeypatch) -> None:
    # The "can the kernels serve this call" check used to look at q and k only, then the kernels
    # refused v with an error instead of the promised fallback.
    gen = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(1, 2, 5, 32, generator=gen), torch.randn(1, 2, 7, 32, generator=gen), \
        torch.randn(1, 2, 7, 600, generator=gen)
    monkeypatch.setattr(fused_attn.sdpa, "_WARNED", set())
    with pytest.warns(UserWarning, match="a head dim of 600"):
        out = fused_attn.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert torch.equal(out, F.scaled_dot_product_attention(q, k, v, is_causal=True))
