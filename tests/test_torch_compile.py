"""torch.compile and torch.export see fused_attn as two custom ops with fake implementations:
no graph break, the same numbers as eager, and torch.library.opcheck passes (fake shapes and
strides, schema, autograd registration, dynamic shapes)."""
from __future__ import annotations

import pytest
import torch

import fused_attn
from fused_attn._function import attention_backward_op, attention_forward_op, op_args
from fused_attn._launch import AttentionParams
from tests.helpers import AttentionCase, make_inputs

OPCHECK_CASES = [
    AttentionCase(1, 2, 2, 17, 17, 16, 16, True, torch.float32),
    AttentionCase(2, 4, 2, 33, 20, 40, 24, True, torch.float32),            # GQA, Sq > Sk, padded head dims
    AttentionCase(1, 3, 1, 9, 50, 64, 64, False, torch.float16, "bshd"),    # MQA, (B, S, H, D) views
    AttentionCase(1, 2, 2, 24, 24, 32, 32, True, torch.bfloat16, "sliced"),  # non-contiguous slices
]


@pytest.mark.parametrize("mask", [None, "bool", "float-grad"])
@pytest.mark.parametrize("case", OPCHECK_CASES, ids=lambda c: c.id)
def test_opcheck_forward_and_backward(case: AttentionCase, mask: str | None, device: str) -> None:
    q, k, v, do = make_inputs(case, device)
    scale = case.head_dim ** -0.5
    bias = None
    if mask == "bool":
        bias = (torch.rand(case.batch, 1, case.seq_q, case.seq_k, device=device) > 0.3).expand(
            case.batch, case.heads_q, case.seq_q, case.seq_k)
    elif mask == "float-grad":
        bias = torch.randn(case.batch, case.heads_q, case.seq_q, case.seq_k, device=device,
                           dtype=case.dtype).requires_grad_()
    params = AttentionParams(scale=scale, window_right=0 if case.causal else -1, bias=bias)
    forward_args = (q.detach().requires_grad_(), k.detach().requires_grad_(), v.detach().requires_grad_(),
                    *op_args(params))
    torch.library.opcheck(attention_forward_op, forward_args)
    # The backward op runs inside autograd's backward (no double backward): plain tensors in.
    params = AttentionParams(scale=scale, window_right=0 if case.causal else -1,
                             bias=None if bias is None else bias.detach())
    with torch.no_grad():
        o, lse = attention_forward_op(q, k, v, *op_args(params))
    torch.library.opcheck(attention_backward_op, (do, q, k, v, o, lse, mask == "float-grad", None, *op_args(params)))


class TinyBlock(torch.nn.Module):
    """A pre-norm causal self-attention block as models write it: (B, S, H, D) views of one
    projection, passed to fused_attn transposed."""

    def __init__(self, width: int = 64, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.norm = torch.nn.LayerNorm(width)
        self.qkv = torch.nn.Linear(width, 3 * width)
        self.proj = torch.nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, width = x.shape
        q, k, v = self.qkv(self.norm(x)).view(batch, seq, 3, self.heads, width // self.heads).unbind(2)
        o = fused_attn.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True)
        return x + self.proj(o.transpose(1, 2).reshape(batch, seq, width))


def _run(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad()
    y = model(x)
    y.square().mean().backward()
    return y.detach(), [p.grad.clone() for p in model.parameters()]


def test_compile_fullgraph_matches_eager(device: str) -> None:
    torch.manual_seed(0)
    model = TinyBlock().to(device)
    x = torch.randn(2, 37, 64, device=device)
    y_eager, grads_eager = _run(model, x)
    compiled = torch.compile(model, fullgraph=True)  # fullgraph: a graph break would raise
    y_compiled, grads_compiled = _run(compiled, x)
    torch.testing.assert_close(y_compiled, y_eager, rtol=1e-5, atol=1e-5)
    for compiled_grad, eager_grad in zip(grads_compiled, grads_eager):
        torch.testing.assert_close(compiled_grad, eager_grad, rtol=1e-4, atol=1e-5)


def test_compiled_graph_calls_the_kernels_once_per_direction(device: str) -> None:
    seen: list[str] = []

    def recording_backend(gm: torch.fx.GraphModule, example_inputs):
        from functorch.compile import make_boxed_func
        from torch._functorch.aot_autograd import aot_module_simplified

        def record(graph_module, _inputs):
            seen.extend(str(n.target) for n in graph_module.graph.nodes if n.op == "call_function")
            return make_boxed_func(graph_module.forward)

        return aot_module_simplified(gm, example_inputs, fw_compiler=record, bw_compiler=record)

    model = TinyBlock().to(device)
    _run(torch.compile(model, backend=recording_backend, fullgraph=True), torch.randn(1, 20, 64, device=device))
    assert seen.count("fused_attn.attention_forward.default") == 1
    assert seen.count("fused_attn.attention_backward.default") == 1


def test_export_keeps_the_op(device: str) -> None:
    model = TinyBlock().to(device).eval()
    x = torch.randn(2, 19, 64, device=device)
    exported = torch.export.export(model, (x,))
    targets = [str(n.target) for n in exported.graph.nodes]
    assert "fused_attn.attention_forward.default" in targets
    torch.testing.assert_close(exported.module()(x), model(x), rtol=0, atol=0)


# Every variant constexpr of the kernels, as the op's arguments see them.
VARIANT_SETTINGS = {
    "window": dict(window=(5, 2)),
    "causal-window-alibi": dict(window=(7, 0), alibi=True),
    "softcap": dict(softcap=3.0),
    "dropout": dict(dropout_p=0.25),
}


@pytest.mark.parametrize("name", list(VARIANT_SETTINGS))
def test_opcheck_variants(name: str, device: str) -> None:
    settings = VARIANT_SETTINGS[name]
    case = AttentionCase(2, 4, 2, 33, 20, 40, 40, False, torch.float32)
    q, k, v, do = make_inputs(case, device)
    slopes = torch.rand(case.heads_q, device=device) if settings.get("alibi") else None
    seed = fused_attn.dropout_seed() if settings.get("dropout_p") else None
    window = settings.get("window", (-1, -1))
    params = op_args(AttentionParams(scale=case.head_dim ** -0.5, window_left=window[0], window_right=window[1],
                                     softcap=settings.get("softcap", 0.0), alibi_slopes=slopes,
                                     dropout_p=settings.get("dropout_p", 0.0), dropout_seed=seed))
    leaves = tuple(t.detach().requires_grad_() for t in (q, k, v))
    torch.library.opcheck(attention_forward_op, (*leaves, *params))
    with torch.no_grad():
        o, lse = attention_forward_op(q, k, v, *params)
    torch.library.opcheck(attention_backward_op, (do, q, k, v, o, lse, False, None, *params))


def test_opcheck_packed_sequences(device: str) -> None:
    lengths_q, lengths_k = [5, 0, 19], [9, 4, 19]
    cu_q = torch.tensor([0, 5, 5, 24], dtype=torch.int32, device=device)
    cu_k = torch.tensor([0, 9, 13, 32], dtype=torch.int32, device=device)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(sum(lengths_q), 4, 32, generator=gen).to(device)
    k, v = (torch.randn(sum(lengths_k), 2, 32, generator=gen).to(device) for _ in range(2))
    params = op_args(AttentionParams(scale=32 ** -0.5, window_right=0, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                                     max_seqlen_q=max(lengths_q), max_seqlen_k=max(lengths_k)))
    leaves = tuple(t.detach().requires_grad_() for t in (q, k, v))
    torch.library.opcheck(attention_forward_op, (*leaves, *params))
    with torch.no_grad():
        o, lse = attention_forward_op(q, k, v, *params)
    assert o.shape == (24, 4, 32) and lse.shape == (4, 24)
    torch.library.opcheck(attention_backward_op, (torch.randn_like(o), q, k, v, o, lse, False, None, *params))


def test_opcheck_sinks_and_compiled_sink_gradient(device: str) -> None:
    """The sinks input of both ops (the backward returns their gradient as a fifth output), and
    a fullgraph-compiled call whose sink gradient equals the eager one."""
    case = AttentionCase(2, 4, 2, 17, 23, 32, 32, True, torch.float32)
    q, k, v, do = make_inputs(case, device)
    sinks = torch.randn(case.heads_q, device=device)
    leaves = tuple(t.detach().requires_grad_() for t in (q, k, v, sinks))
    params = AttentionParams(scale=case.head_dim ** -0.5, window_right=0, sinks=leaves[3])
    torch.library.opcheck(attention_forward_op, (*leaves[:3], *op_args(params)))
    params = AttentionParams(scale=case.head_dim ** -0.5, window_right=0, sinks=sinks)
    with torch.no_grad():
        o, lse = attention_forward_op(q, k, v, *op_args(params))
    torch.library.opcheck(attention_backward_op, (do, q, k, v, o, lse, False, None, *op_args(params)))

    def run(fn):
        leaf = sinks.clone().requires_grad_()
        out = fn(q, k, v, leaf)
        (out * do).sum().backward()
        return out.detach(), leaf.grad

    def call(q, k, v, s):
        return fused_attn.attention(q, k, v, causal=True, sinks=s)

    eager, compiled = run(call), run(torch.compile(call, fullgraph=True, backend="aot_eager"))
    assert torch.equal(eager[0], compiled[0]) and torch.equal(eager[1], compiled[1])


class VariantBlock(TinyBlock):
    """TinyBlock with every variant at once: a causal sliding window, ALiBi, softcap and, while
    training, dropout."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("slopes", torch.tensor([0.5, 0.25, 0.125, 0.0625]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, width = x.shape
        q, k, v = self.qkv(self.norm(x)).view(batch, seq, 3, self.heads, width // self.heads).unbind(2)
        o = fused_attn.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True,
                                 window=(8, 0), alibi_slopes=self.slopes, softcap=5.0,
                                 dropout_p=0.2 if self.training else 0.0)
        return x + self.proj(o.transpose(1, 2).reshape(batch, seq, width))


class PackedBlock(TinyBlock):
    """TinyBlock over packed sequences: x is (total, width) with boundaries cu_seqlens."""

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int) -> torch.Tensor:
        total, width = x.shape
        q, k, v = self.qkv(self.norm(x)).view(total, 3, self.heads, width // self.heads).unbind(1)
        o = fused_attn.attention_varlen(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, causal=True)
        return x + self.proj(o.reshape(total, width))


def _run_seeded(model: torch.nn.Module, *inputs: object) -> tuple[torch.Tensor, list[torch.Tensor]]:
    torch.manual_seed(1234)  # the dropout seed comes from torch's default generator
    model.zero_grad()
    y = model(*inputs)
    y.square().mean().backward()
    return y.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train-dropout"])
def test_compile_fullgraph_variants_match_eager(training: bool, device: str) -> None:
    torch.manual_seed(0)
    model = VariantBlock().to(device).train(training)
    x = torch.randn(2, 29, 64, device=device)
    y_eager, grads_eager = _run_seeded(model, x)
    # Inductor has its own RNG for torch.randint unless fallback_random: with it, the compiled
    # graph draws the same dropout seed as eager, so the results can be compared.
    with torch._inductor.config.patch(fallback_random=True):
        compiled = torch.compile(model, fullgraph=True)
        y_compiled, grads_compiled = _run_seeded(compiled, x)
    torch.testing.assert_close(y_compiled, y_eager, rtol=1e-5, atol=1e-5)
    for compiled_grad, eager_grad in zip(grads_compiled, grads_eager):
        torch.testing.assert_close(compiled_grad, eager_grad, rtol=1e-4, atol=1e-5)
    if training:  # dropout really ran: eval mode gives something else
        assert not torch.allclose(model.eval()(x), y_eager)


def test_compile_fullgraph_packed_sequences_match_eager(device: str) -> None:
    torch.manual_seed(0)
    model = PackedBlock().to(device)
    cu_seqlens = torch.tensor([0, 7, 8, 30], dtype=torch.int32, device=device)
    x = torch.randn(30, 64, device=device)
    y_eager, grads_eager = _run_seeded(model, x, cu_seqlens, 22)
    y_compiled, grads_compiled = _run_seeded(torch.compile(model, fullgraph=True), x, cu_seqlens, 22)
    torch.testing.assert_close(y_compiled, y_eager, rtol=1e-5, atol=1e-5)
    for compiled_grad, eager_grad in zip(grads_compiled, grads_eager):
        torch.testing.assert_close(compiled_grad, eager_grad, rtol=1e-4, atol=1e-5)
