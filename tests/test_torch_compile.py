"""torch.compile and torch.export see fused_attn as two custom ops with fake implementations:
no graph break, the same numbers as eager, and torch.library.opcheck passes (fake shapes and
strides, schema, autograd registration, dynamic shapes)."""
from __future__ import annotations

import pytest
import torch

import fused_attn
from fused_attn._function import attention_backward_op, attention_forward_op
from tests.helpers import Case, make_inputs

OPCHECK_CASES = [
    Case(1, 2, 2, 17, 17, 16, 16, True, torch.float32),
    Case(2, 4, 2, 33, 20, 40, 24, True, torch.float32),            # GQA, Sq > Sk, padded head dims
    Case(1, 3, 1, 9, 50, 64, 64, False, torch.float16, "bshd"),    # MQA, (B, S, H, D) views
    Case(1, 2, 2, 24, 24, 32, 32, True, torch.bfloat16, "sliced"),  # non-contiguous slices
]


@pytest.mark.parametrize("mask", [None, "bool", "float-grad"])
@pytest.mark.parametrize("case", OPCHECK_CASES, ids=lambda c: c.id)
def test_opcheck_forward_and_backward(case: Case, mask: str | None, device: str) -> None:
    q, k, v, do = make_inputs(case, device)
    scale = case.head_dim ** -0.5
    bias = None
    if mask == "bool":
        bias = (torch.rand(case.batch, 1, case.seq_q, case.seq_k, device=device) > 0.3).expand(
            case.batch, case.heads_q, case.seq_q, case.seq_k)
    elif mask == "float-grad":
        bias = torch.randn(case.batch, case.heads_q, case.seq_q, case.seq_k, device=device,
                           dtype=case.dtype).requires_grad_()
    window_right = 0 if case.causal else -1
    settings = (scale, -1, window_right, 0.0, 0.0, 0, 0)
    forward_args = (q.detach().requires_grad_(), k.detach().requires_grad_(), v.detach().requires_grad_(),
                    bias, None, None, None, None, *settings)
    torch.library.opcheck(attention_forward_op, forward_args)
    # The backward op runs inside autograd's backward (no double backward): plain tensors in.
    bias = None if bias is None else bias.detach()
    with torch.no_grad():
        o, lse = attention_forward_op(q, k, v, bias, None, None, None, None, *settings)
    torch.library.opcheck(attention_backward_op,
                          (do, q, k, v, o, lse, bias, None, None, None, None, *settings, mask == "float-grad"))


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
