"""Train a small causal transformer with its sequence sharded over ranks (context parallelism),
and check that its loss and gradients equal a single-process run on the whole sequence.

    torchrun --nproc-per-node 2 examples/context_parallel_train.py              # gloo on CPU
    torchrun --nproc-per-node 4 examples/context_parallel_train.py --method ulysses
    torchrun --nproc-per-node 8 examples/context_parallel_train.py --seq 65536   # NCCL on GPUs

Every rank holds one piece of each sequence (`fused_attn.distributed.shard_sequence`, zigzag by
default so causal work is balanced) and runs the model on it; attention is
`context_parallel_attention`, everything else is per token. The loss is the mean over all tokens:
each rank sums its tokens' losses and the ranks all-reduce the sum, and the parameter gradients
are all-reduced too, as a data-parallel wrapper would. Rank 0 also runs the same model on the
whole sequence in one process and compares: loss every step and every gradient at the first one,
under FlashAttention's rule against a float64 copy. Without a GPU the kernels run through the
Triton interpreter (set automatically), so keep the sizes small there.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import fused_attn  # noqa: E402
import fused_attn.distributed as fad  # noqa: E402


class Block(torch.nn.Module):
    def __init__(self, width: int, heads: int, kv_heads: int) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, width // heads
        self.norm1, self.norm2 = torch.nn.LayerNorm(width), torch.nn.LayerNorm(width)
        self.q = torch.nn.Linear(width, width)
        self.kv = torch.nn.Linear(width, 2 * kv_heads * self.head_dim)
        self.out = torch.nn.Linear(width, width)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(width, 4 * width), torch.nn.GELU(), torch.nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor, attend) -> torch.Tensor:
        batch, seq, width = x.shape
        h = self.norm1(x)
        q = self.q(h).view(batch, seq, self.heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(h).view(batch, seq, 2, self.kv_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        x = x + self.out(attend(q, k, v).transpose(1, 2).reshape(batch, seq, width))
        return x + self.mlp(self.norm2(x))


class TinyLM(torch.nn.Module):
    def __init__(self, vocab: int, width: int, heads: int, kv_heads: int, layers: int, max_seq: int) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, width)
        self.position = torch.nn.Embedding(max_seq, width)
        self.blocks = torch.nn.ModuleList(Block(width, heads, kv_heads) for _ in range(layers))
        self.head = torch.nn.Linear(width, vocab)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, attend) -> torch.Tensor:
        """tokens, positions (B, S): any subset of a sequence's positions, with their global indices."""
        x = self.embed(tokens) + self.position(positions)
        for block in self.blocks:
            x = block(x, attend)
        return self.head(x)


def token_loss_sum(model: TinyLM, tokens, positions, labels, attend) -> torch.Tensor:
    logits = model(tokens, positions, attend)
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), reduction="sum")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", choices=fad.METHODS, default="ring")
    parser.add_argument("--layout", choices=fad.LAYOUTS, default="zigzag")
    parser.add_argument("--seq", type=int, default=48, help="tokens per sequence (divisible by 2 x ranks)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--width", type=int, default=64)
    args = parser.parse_args(argv)

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    torch.manual_seed(0)
    vocab, heads, kv_heads = 97, 4, 2
    model = TinyLM(vocab, args.width, heads, kv_heads, layers=2, max_seq=args.seq).to(device)
    tokens = torch.randint(0, vocab, (args.batch, args.seq + 1), device=device)  # same on every rank (same seed)
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    positions = torch.arange(args.seq, device=device).expand(args.batch, -1)

    def shard(t: torch.Tensor) -> torch.Tensor:
        return fad.shard_sequence(t, layout=args.layout, dim=1)

    checked = set()

    def attend_sharded(q, k, v):
        # The ranks' calls are compared once per shape; later steps skip the host wait.
        first = tuple(q.shape) not in checked
        checked.add(tuple(q.shape))
        return fad.context_parallel_attention(q, k, v, method=args.method, layout=args.layout, causal=True,
                                              check_ranks=first)

    def attend_whole(q, k, v):
        return fused_attn.attention(q, k, v, causal=True)

    whole = copy.deepcopy(model) if rank == 0 else None
    golden = copy.deepcopy(model).double() if rank == 0 else None
    tokens_total = args.batch * args.seq
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    whole_optimizer = torch.optim.SGD(whole.parameters(), lr=0.1) if whole is not None else None
    failures = 0
    for step in range(args.steps):
        optimizer.zero_grad()
        loss = token_loss_sum(model, shard(inputs), shard(positions), shard(labels), attend_sharded)
        loss.backward()
        dist.all_reduce(loss_sum := loss.detach().clone())
        for p in model.parameters():
            dist.all_reduce(p.grad)
            p.grad /= tokens_total
        sharded_loss = loss_sum.item() / tokens_total
        if rank == 0:
            whole_optimizer.zero_grad()
            whole_loss = token_loss_sum(whole, inputs, positions, labels, attend_whole) / tokens_total
            whole_loss.backward()
            line = f"step {step}: loss {sharded_loss:.6f} sharded over {world} ranks ({args.method}, {args.layout}), " \
                   f"{whole_loss.item():.6f} in one process"
            if abs(sharded_loss - whole_loss.item()) > 1e-4 * max(1.0, abs(whole_loss.item())):
                line += "  MISMATCH"
                failures += 1
            print(line, flush=True)
            if step == 0:
                failures += compare_gradients(model, whole, golden, inputs, positions, labels, tokens_total)
            whole_optimizer.step()
        optimizer.step()
    dist.barrier()
    dist.destroy_process_group()
    if rank == 0:
        print("loss and gradients match" if failures == 0 else f"{failures} mismatches")
    return 1 if failures else 0


def compare_gradients(model, whole, golden, inputs, positions, labels, tokens_total) -> int:
    """Sharded and one-process gradients, each against float64 (FlashAttention's rule: the sharded
    error at most 3x the one-process error, plus a floor)."""
    def attend_golden(q, k, v):
        return fused_attn.reference.attention(q, k, v, causal=True)

    (token_loss_sum(golden, inputs, positions, labels, attend_golden) / tokens_total).backward()
    failures = 0
    for (name, p), q, g in zip(model.named_parameters(), whole.parameters(), golden.parameters()):
        sharded_err = (p.grad.double() - g.grad).abs().max().item()
        whole_err = (q.grad.double() - g.grad).abs().max().item()
        if sharded_err > 3 * whole_err + 1e-6 * max(1.0, g.grad.abs().max().item()):
            print(f"  gradient of {name}: error {sharded_err:.2e} against float64, one process {whole_err:.2e}  MISMATCH")
            failures += 1
    print(f"  gradients of all {len(list(model.parameters()))} parameters: sharded error within 3x the "
          f"one-process error against float64" if failures == 0 else f"  {failures} gradients differ")
    return failures


if __name__ == "__main__":
    sys.exit(main())
