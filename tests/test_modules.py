"""fused_attn.nn.MultiheadAttention against torch.nn.MultiheadAttention with the same weights,
and swap_attention on a model built from torch's own transformer layers."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

import fused_attn
from fused_attn import reference
from fused_attn.nn import MultiheadAttention
from tests.helpers import reference_with_kernels_dropout

CASES = [  # (embed, heads, kwargs of the constructor, (L, S, N), is_causal)
    (64, 4, {}, (17, 17, 2), False),
    (64, 4, {"batch_first": True}, (33, 20, 3), False),               # cross-attention, L != S
    (48, 3, {"batch_first": True, "bias": False}, (25, 25, 1), True),  # head dim 16, causal
    (40, 2, {"kdim": 24, "vdim": 56}, (9, 30, 2), False),             # separate projections, head dim 20
    (64, 8, {}, (20, 20, None), True),                                # unbatched (L, E)
]


def _inputs(embed: int, kwargs: dict, lengths: tuple, device: str, dtype: torch.dtype):
    seq_q, seq_k, batch = lengths
    gen = torch.Generator().manual_seed(0)

    def make(seq: int, width: int) -> torch.Tensor:
        shape = (seq, width) if batch is None else ((batch, seq, width) if kwargs.get("batch_first") else (seq, batch, width))
        return torch.randn(shape, generator=gen).to(device=device, dtype=dtype).requires_grad_()

    return make(seq_q, embed), make(seq_k, kwargs.get("kdim", embed)), make(seq_k, kwargs.get("vdim", embed))


@pytest.mark.parametrize("embed,heads,kwargs,lengths,is_causal", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_matches_torch_module_with_loaded_weights(embed, heads, kwargs, lengths, is_causal, dtype, device) -> None:
    torch.manual_seed(0)
    theirs = torch.nn.MultiheadAttention(embed, heads, **kwargs).to(device)
    ours = MultiheadAttention(embed, heads, **kwargs).to(device)
    ours.load_state_dict(theirs.state_dict())
    assert list(ours.state_dict()) == list(theirs.state_dict())
    golden = torch.nn.MultiheadAttention(embed, heads, **kwargs).to(device).double()
    golden.load_state_dict(theirs.state_dict())
    theirs, ours = theirs.to(dtype), ours.to(dtype)
    mask = None
    if is_causal:
        mask = torch.nn.Transformer.generate_square_subsequent_mask(lengths[0], device=device, dtype=dtype)

    results = {}
    for name, module, cast in (("ours", ours, dtype), ("theirs", theirs, dtype), ("golden", golden, torch.float64)):
        q, k, v = (t.detach().to(cast).requires_grad_() for t in _inputs(embed, kwargs, lengths, device, dtype))
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the fused path must not fall back
            out, weights = module(q, k, v, need_weights=False, is_causal=is_causal,
                                  attn_mask=None if mask is None else mask.to(cast))
        assert weights is None
        out.square().sum().backward()
        results[name] = [out.detach()] + [t.grad for t in (q, k, v)] + [p.grad for p in module.parameters()]
    # FlashAttention's rule on the whole module: our error against float64 is at most 2x (output)
    # or 3x (gradients) torch's own in the same dtype, plus a small floor.
    floor = 1e-5 if dtype == torch.float32 else 1e-2
    for i, (mine, torchs, gold) in enumerate(zip(results["ours"], results["theirs"], results["golden"])):
        assert mine.shape == gold.shape
        my_err = (mine.double() - gold).abs().max().item()
        torch_err = (torchs.double() - gold).abs().max().item()
        assert my_err <= (2 if i == 0 else 3) * torch_err + floor * gold.abs().max().item(), (i, my_err, torch_err)


PADDING = torch.arange(11)[None, :] >= torch.tensor([11, 6])[:, None]  # True = a padded key (torch's convention)


@pytest.mark.parametrize("masks", [
    {"key_padding_mask": PADDING},
    {"key_padding_mask": torch.zeros(2, 11).masked_fill(PADDING, float("-inf"))},
    {"attn_mask": torch.rand(11, 11) > 0.8},
    {"attn_mask": torch.randn(2 * 2, 11, 11), "key_padding_mask": PADDING},
    {"attn_mask": torch.nn.Transformer.generate_square_subsequent_mask(11), "key_padding_mask": PADDING,
     "is_causal": True},
], ids=["padding-bool", "padding-float", "attn-bool", "attn-float+padding", "causal+padding"])
def test_masks_run_in_the_kernels_and_match_torch(masks: dict) -> None:
    torch.manual_seed(0)
    theirs = torch.nn.MultiheadAttention(32, 2, batch_first=True)
    ours = MultiheadAttention(32, 2, batch_first=True)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 11, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback
        got, _ = ours(x, x, x, need_weights=False, **masks)
    expected, _ = theirs(x, x, x, need_weights=False, **masks)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("call,reason", [
    (lambda m, x: m(x, x, x), "need_weights=True"),
    (lambda m, x: m(x, x, x, key_padding_mask=PADDING), "need_weights=True"),
])
def test_unsupported_calls_fall_back_with_a_warning_and_torchs_result(call, reason) -> None:
    torch.manual_seed(0)
    theirs = torch.nn.MultiheadAttention(32, 2, batch_first=True)
    ours = MultiheadAttention(32, 2, batch_first=True)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 11, 32)
    fused_attn.nn._WARNED.clear()
    with pytest.warns(UserWarning, match=reason):
        got = call(ours, x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per reason
        call(ours, x)
    expected = call(theirs, x)
    torch.testing.assert_close(got[0], expected[0])
    assert (got[1] is None) == (expected[1] is None)


def test_dropout_while_training_runs_in_the_kernels(monkeypatch) -> None:
    """Training-mode dropout runs in the kernels (with the padding mask), repeatable under
    torch.manual_seed and equal to the reference with the kernels' mask (output and parameter
    gradients, under FlashAttention's rule); eval mode has no dropout and matches torch's module."""
    torch.manual_seed(0)
    ours = MultiheadAttention(32, 2, dropout=0.4, batch_first=True)
    theirs = torch.nn.MultiheadAttention(32, 2, dropout=0.4, batch_first=True)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 11, 32)
    dropout_ps: list[float] = []
    original = fused_attn.nn.attention
    monkeypatch.setattr(fused_attn.nn, "attention",
                        lambda *a, **kw: dropout_ps.append(kw["dropout_p"]) or original(*a, **kw))

    def run(module: torch.nn.Module) -> list[torch.Tensor]:
        module.zero_grad()
        torch.manual_seed(5)
        xs = x.to(next(module.parameters()).dtype)
        out, _ = module(xs, xs, xs, need_weights=False, key_padding_mask=PADDING)
        out.square().sum().backward()
        return [out.detach()] + [p.grad.clone() for p in module.parameters()]

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback
        mine = run(ours)
        assert dropout_ps == [0.4]
        assert all(torch.equal(a, b) for a, b in zip(mine, run(ours)))  # the same seed, the same mask
    monkeypatch.setattr(fused_attn.nn, "attention", reference_with_kernels_dropout)
    monkeypatch.setattr(MultiheadAttention, "_why_not_fused", lambda *args: None)  # float64 too
    plain, golden = run(copy.deepcopy(ours)), run(copy.deepcopy(ours).double())
    for i, (got, theirs_plain, gold) in enumerate(zip(mine, plain, golden)):
        my_err = (got.double() - gold).abs().max().item()
        plain_err = (theirs_plain.double() - gold).abs().max().item()
        assert plain_err <= 1e-4 * gold.abs().max().item()  # the same mask in both references
        assert my_err <= (2 if i == 0 else 3) * plain_err + 1e-5 * gold.abs().max().item(), (i, my_err, plain_err)

    monkeypatch.undo()
    ours.eval(), theirs.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        evaluated, _ = ours(x, x, x, need_weights=False, key_padding_mask=PADDING)
    expected, _ = theirs(x, x, x, need_weights=False, key_padding_mask=PADDING)
    torch.testing.assert_close(evaluated, expected, rtol=1e-4, atol=1e-5)
    assert (evaluated - mine[0]).abs().max() > 0.1  # training dropped weights


def test_swap_attention_in_a_torch_transformer(device: str) -> None:
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(64, 4, dim_feedforward=128, dropout=0.0, batch_first=True)
    model = torch.nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False).to(device)
    x = torch.randn(2, 21, 64, device=device)
    mask = torch.nn.Transformer.generate_square_subsequent_mask(21, device=device)
    expected = model(x, mask=mask, is_causal=True)
    params = [p.data_ptr() for p in model.parameters()]

    assert fused_attn.swap_attention(model) == 2
    assert all(type(m.self_attn) is MultiheadAttention for m in model.layers)
    assert [p.data_ptr() for p in model.parameters()] == params  # the same weights, not copies
    assert fused_attn.swap_attention(model) == 0
    calls: list[int] = []
    for m in model.layers:  # proof that the layers call the swapped module (no torch fast path)
        m.self_attn.register_forward_hook(lambda *args: calls.append(1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = model(x, mask=mask, is_causal=True)
    assert len(calls) == 2
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
