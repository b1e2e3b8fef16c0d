"""A real attention pattern: a tiny encoder-decoder transformer learns to reverse a sequence, and
its cross-attention, read back with fused_attn, shows the anti-diagonal alignment.

The model (plain torch modules: token embedding + learned positions, two pre-LN encoder layers and
one decoder layer with causal self-attention and cross-attention, d_model 64, 4 heads) is trained
with teacher forcing on random sequences of 10 letters, with torch's `scaled_dot_product_attention`
for speed. The decoder's only path to the source is its cross-attention, so that is where the
reversal has to happen. Afterwards, for one held-out sequence, the queries, keys and values of the
(last) decoder layer's cross-attention go through

* `fused_attn.attention(q, k, v, return_lse=True)` (checked against the model's own output),
* `fused_attn.attention_probs(q, k, lse)`: the exact attention map, drawn with
  `fused_attn.plot.heatmap` (source tokens on x, output positions on y),
* `fused_attn.attention_stats(q, k)`: the attention each source token receives, drawn with
  `fused_attn.plot.received`.

Output position i copies source position L-1-i, so the map is an anti-diagonal; the script prints
how much of each output row's mass lies there.

    python examples/reverse_attention.py                 # ~15 s on one CPU core, PNGs to docs/
    python examples/reverse_attention.py --steps 100 --out /tmp/rev

The model trains on the CPU; fused_attn runs on the GPU when there is one, else on CPU tensors through
the Triton interpreter.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

if not torch.cuda.is_available():  # before triton is imported, so fused_attn's kernels interpret
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fused_attn  # noqa: E402
import fused_attn.plot  # noqa: E402

VOCAB = 16          # source tokens are the letters A..P
BOS = VOCAB         # decoder start token
LENGTH = 10         # tokens per sequence
D_MODEL = 64
HEADS = 4
ENCODER_LAYERS = 2
DECODER_LAYERS = 1
STEPS = 400
BATCH = 64
SEED = 0
POS_STD = 1.0       # learned positions start as large as the token embeddings: sharp positional attention
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "docs"


def letters(tokens: Sequence[int] | torch.Tensor) -> list[str]:
    return [chr(ord("A") + int(t)) for t in tokens]


# ----------------------------------------------------------------------------------------- model
class Attention(nn.Module):
    """Multi-head attention with torch SDPA. When `keep` is set, the last call's q, k, v (B, H, S, d)
    and per-head output (B, H, Sq, d), before the output projection, are kept in `self.kept`."""

    def __init__(self, d_model: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(d_model, d_model)
        self.kv = nn.Linear(d_model, 2 * d_model)
        self.out = nn.Linear(d_model, d_model)
        self.keep = False
        self.kept: dict[str, torch.Tensor] = {}

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, _ = x.shape
        return x.view(batch, seq, self.heads, -1).transpose(1, 2)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, causal: bool = False) -> torch.Tensor:
        q = self._split(self.q(x))
        k, v = (self._split(t) for t in self.kv(memory).chunk(2, dim=-1))
        o = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        if self.keep:
            self.kept = {"q": q.detach(), "k": k.detach(), "v": v.detach(), "o": o.detach()}
        return self.out(o.transpose(1, 2).flatten(2))


class FeedForward(nn.Sequential):
    def __init__(self, d_model: int) -> None:
        super().__init__(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model))


class EncoderLayer(nn.Module):
    def __init__(self, d_model: int, heads: int) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(d_model), Attention(d_model, heads)
        self.norm2, self.ff = nn.LayerNorm(d_model), FeedForward(d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h)
        return x + self.ff(self.norm2(x))


class DecoderLayer(nn.Module):
    def __init__(self, d_model: int, heads: int) -> None:
        super().__init__()
        self.norm1, self.self_attn = nn.LayerNorm(d_model), Attention(d_model, heads)
        self.norm2, self.cross_attn = nn.LayerNorm(d_model), Attention(d_model, heads)
        self.norm3, self.ff = nn.LayerNorm(d_model), FeedForward(d_model)

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.self_attn(h, h, causal=True)
        x = x + self.cross_attn(self.norm2(x), memory)
        return x + self.ff(self.norm3(x))


class Reverser(nn.Module):
    """Encoder-decoder transformer: source (B, L) tokens -> logits (B, L, VOCAB) for the reversed
    sequence, given the decoder input [BOS, y_0, ..., y_{L-2}] (teacher forcing)."""

    def __init__(self, vocab: int = VOCAB, length: int = LENGTH, d_model: int = D_MODEL, heads: int = HEADS,
                 encoder_layers: int = ENCODER_LAYERS, decoder_layers: int = DECODER_LAYERS) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab + 1, d_model)  # + BOS
        self.src_pos = nn.Parameter(torch.randn(length, d_model) * POS_STD)
        self.tgt_pos = nn.Parameter(torch.randn(length, d_model) * POS_STD)
        self.encoder = nn.ModuleList(EncoderLayer(d_model, heads) for _ in range(encoder_layers))
        self.decoder = nn.ModuleList(DecoderLayer(d_model, heads) for _ in range(decoder_layers))
        self.enc_norm, self.dec_norm = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab)

    def encode(self, src: torch.Tensor) -> torch.Tensor:
        x = self.embed(src) + self.src_pos[: src.shape[1]]
        for layer in self.encoder:
            x = layer(x)
        return self.enc_norm(x)

    def decode(self, tgt_in: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        x = self.embed(tgt_in) + self.tgt_pos[: tgt_in.shape[1]]
        for layer in self.decoder:
            x = layer(x, memory)
        return self.head(self.dec_norm(x))

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        return self.decode(tgt_in, self.encode(src))

    @torch.no_grad()
    def generate(self, src: torch.Tensor) -> torch.Tensor:
        """Greedy decoding: (B, L) source -> (B, L) output tokens."""
        memory = self.encode(src)
        out = torch.full((src.shape[0], 1), BOS, dtype=torch.long)
        for _ in range(src.shape[1]):
            next_token = self.decode(out, memory)[:, -1].argmax(-1, keepdim=True)
            out = torch.cat([out, next_token], dim=1)
        return out[:, 1:]


def batch_of(count: int, generator: torch.Generator, length: int = LENGTH) -> tuple[torch.Tensor, ...]:
    """Random sources (count, L), the decoder inputs [BOS, reversed[:-1]] and the targets (reversed)."""
    src = torch.randint(0, VOCAB, (count, length), generator=generator)
    target = src.flip(1)
    tgt_in = torch.cat([torch.full((count, 1), BOS), target[:, :-1]], dim=1)
    return src, tgt_in, target


# ------------------------------------------------------------------------------------- training
def train(steps: int = STEPS, seed: int = SEED, log_every: int = 0) -> tuple[Reverser, float]:
    """Train a Reverser for `steps` AdamW steps on fresh random batches; return it (in eval mode) and
    the mean loss of the last 20 steps. Runs on one CPU thread (restored afterwards): the matmuls are
    tiny, and more threads only fight over the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(steps, seed, log_every)
    finally:
        torch.set_num_threads(threads)


def _train(steps: int, seed: int, log_every: int) -> tuple[Reverser, float]:
    torch.manual_seed(seed)
    model = Reverser()
    generator = torch.Generator().manual_seed(seed + 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    warmup = max(1, min(50, steps // 10))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / max(1, steps)))))
    losses: list[float] = []
    model.train()
    for step in range(steps):
        src, tgt_in, target = batch_of(BATCH, generator)
        loss = F.cross_entropy(model(src, tgt_in).flatten(0, 1), target.flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if log_every and (step + 1) % log_every == 0:
            print(f"  step {step + 1:4d}  loss {sum(losses[-log_every:]) / log_every:.4f}", file=sys.stderr)
    model.eval()
    tail = losses[-20:]
    return model, (sum(tail) / len(tail) if tail else float("nan"))


@torch.no_grad()
def accuracy(model: Reverser, count: int = 512, seed: int = SEED + 1000) -> tuple[float, float]:
    """Greedy-decoding accuracy on `count` held-out random sequences: (per token, whole sequence)."""
    src, _, target = batch_of(count, torch.Generator().manual_seed(seed))
    correct = model.generate(src) == target
    return correct.float().mean().item(), correct.all(dim=1).float().mean().item()


# ------------------------------------------------------------------------- reading the attention
@dataclass
class CrossAttention:
    """The last decoder layer's cross-attention on one sequence, read back with fused_attn."""
    src: torch.Tensor        # (L,) source tokens
    output: torch.Tensor     # (L,) the model's greedy output
    q: torch.Tensor          # (1, H, L, d) decoder queries
    k: torch.Tensor          # (1, H, L, d) encoder keys
    v: torch.Tensor          # (1, H, L, d)
    model_out: torch.Tensor  # (1, H, L, d) the model's own (SDPA) attention output
    kernel_out: torch.Tensor  # (1, H, L, d) fused_attn.attention's output
    lse: torch.Tensor        # (1, H, L)
    probs: torch.Tensor      # (1, H, L, L) fused_attn.attention_probs
    stats: fused_attn.AttentionStats

    @property
    def max_error(self) -> float:
        """Largest |fused_attn.attention - the model's SDPA output|."""
        return (self.kernel_out.float() - self.model_out.float()).abs().max().item()


@torch.no_grad()
def cross_attention(model: Reverser, src: torch.Tensor) -> CrossAttention:
    """Decode `src` (L,) greedily, rerun the decoder on that output with the last cross-attention
    keeping its q, k, v, and read that attention with fused_attn's kernels."""
    src = src.view(1, -1)
    output = model.generate(src)
    tgt_in = torch.cat([torch.full((1, 1), BOS), output[:, :-1]], dim=1)
    layer = model.decoder[-1].cross_attn
    layer.keep = True
    try:
        model(src, tgt_in)
    finally:
        layer.keep = False
    kept = layer.kept
    q, k, v = (kept[n].contiguous() for n in ("q", "k", "v"))
    # The model stays on the CPU; the kernels run on the GPU when there is one, else interpreted.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    qd, kd, vd = (t.to(device) for t in (q, k, v))
    kernel_out, lse = fused_attn.attention(qd, kd, vd, return_lse=True)
    probs = fused_attn.attention_probs(qd, kd, lse)
    stats = fused_attn.attention_stats(qd, kd)
    stats = fused_attn.AttentionStats(*(t.cpu() for t in (stats.lse, stats.entropy, stats.max_prob, stats.received)))
    return CrossAttention(src[0], output[0], q, k, v, kept["o"], kernel_out.cpu(), lse.cpu(), probs.cpu(), stats)


def anti_diagonal_mass(probs: torch.Tensor) -> torch.Tensor:
    """For (..., L, L) attention maps: the mean over rows of the probability that output row i puts
    on source position L-1-i, the one it copies. (...,)"""
    return probs.flip(-1).diagonal(dim1=-2, dim2=-1).mean(-1)


def float64_softmax(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) in float64: the model's own attention weights."""
    q, k = q.double(), k.double()
    return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)


def save_plots(attn: CrossAttention, out: Path) -> tuple[Path, Path]:
    """Heat map of the head-averaged cross-attention (output positions on y, source tokens on x) and
    bar chart of the attention each source token receives (also averaged over heads)."""
    source = [f"{c}{i}" for i, c in enumerate(letters(attn.src))]
    produced = [f"{i}:{c}" for i, c in enumerate(letters(attn.output))]
    heads = attn.probs.shape[1]
    mass = anti_diagonal_mass(attn.probs[0].mean(0)).item()
    heat = fused_attn.plot.heatmap(
        attn.probs[0].mean(0), out / "reverse_cross_attention.png", row_labels=produced, col_labels=source,
        title=f"Reversing {''.join(letters(attn.src))}: decoder cross-attention, mean of {heads} heads\n"
              f"(fused_attn.attention_probs; anti-diagonal mass {mass:.2f})",
        xlabel="source token (letter, position)", ylabel="output (position: letter)")
    bars = fused_attn.plot.received(
        attn.stats.received[0].mean(0), out / "reverse_received.png", labels=source,
        title=f"Attention each source token receives from the {attn.q.shape[2]} output positions "
              f"(fused_attn.attention_stats, mean of {heads} heads)",
        xlabel="source token (letter, position)")
    return heat, bars


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=STEPS, help=f"training steps (default {STEPS})")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for the PNGs (default docs/)")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--log-every", type=int, default=0, help="print the training loss every N steps")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    model, loss = train(args.steps, args.seed, args.log_every)
    train_s = time.perf_counter() - start
    token_acc, seq_acc = accuracy(model, seed=args.seed + 1000)
    print(f"trained {args.steps} steps in {train_s:.1f} s; final loss {loss:.4f}")
    print(f"held-out reversal accuracy: {token_acc:.1%} of tokens, {seq_acc:.1%} of whole sequences")

    src = batch_of(1, torch.Generator().manual_seed(args.seed + 2000))[0][0]
    attn = cross_attention(model, src)
    print(f"example: {' '.join(letters(attn.src))} -> {' '.join(letters(attn.output))}")
    print(f"fused_attn.attention vs the model's SDPA output: max |diff| {attn.max_error:.2e}")
    probs_error = (attn.probs.double() - float64_softmax(attn.q, attn.k)).abs().max().item()
    print(f"fused_attn.attention_probs vs the model's softmax weights in float64: max |diff| {probs_error:.2e}")
    if attn.max_error > 1e-4 or probs_error > 1e-4:
        raise RuntimeError("fused_attn disagrees with the model's own attention")
    per_head = anti_diagonal_mass(attn.probs[0])
    mean_map = anti_diagonal_mass(attn.probs[0].mean(0)).item()
    per_row = attn.probs[0].mean(0).flip(-1).diagonal()
    print("anti-diagonal mass (attention an output row puts on the source position it copies, mean over rows): "
          f"{mean_map:.3f} for the head-averaged map; per head " + ", ".join(f"{m:.3f}" for m in per_head.tolist()))
    print("  per output row (head-averaged): " + " ".join(f"{m:.2f}" for m in per_row.tolist()))
    heat, bars = save_plots(attn, args.out)
    print(f"wrote {heat} ({heat.stat().st_size // 1024} KB) and {bars} ({bars.stat().st_size // 1024} KB)")
    return {"loss": loss, "token_accuracy": token_acc, "sequence_accuracy": seq_acc, "max_error": attn.max_error,
            "probs_error": probs_error,
            "anti_diagonal": mean_map, "anti_diagonal_per_head": per_head.tolist(), "heatmap": heat,
            "received": bars, "model": model, "attention": attn}


if __name__ == "__main__":
    main()
