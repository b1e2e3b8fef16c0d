"""fused_attn.plot writes valid PNGs and checks its inputs; examples/reverse_attention.py runs end to
end, and its trained model's cross-attention, read back with attention_probs, is the anti-diagonal
alignment a reversal needs (and equals the model's own softmax weights)."""
from __future__ import annotations

import importlib.util
import struct
import sys
from pathlib import Path

import pytest
import torch

import fused_attn
import fused_attn.plot

pytest.importorskip("matplotlib")

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "reverse_attention.py"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def example():
    """examples/reverse_attention.py imported by path (examples/ is not a package)."""
    spec = importlib.util.spec_from_file_location("reverse_attention_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)




def assert_png(path: Path, min_bytes: int = 2000) -> tuple[int, int]:
    """A PNG file of non-trivial size; returns its (width, height) from the IHDR chunk."""
    data = Path(path).read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    assert len(data) > min_bytes, f"{path} has only {len(data)} bytes"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert width > 100 and height > 100
    return width, height


# ------------------------------------------------------------------------------------ plot module
def test_heatmap_writes_png_of_attention_probs(tmp_path, device):
    torch.manual_seed(0)
    q, k, v = (t.to(device) for t in (torch.randn(1, 2, 6, 16), torch.randn(1, 2, 9, 16), torch.randn(1, 2, 9, 16)))
    _, lse = fused_attn.attention(q, k, v, return_lse=True)
    probs = fused_attn.attention_probs(q, k, lse, heads=[1])
    path = fused_attn.plot.heatmap(probs[0, 0], tmp_path / "sub" / "map.png", row_labels=list("abcdef"),
                                   col_labels=[f"t{i}" for i in range(9)], title="a title " * 20)
    assert path == tmp_path / "sub" / "map.png"
    assert_png(path)
    # No labels, other dtypes, a tensor that needs grad, a plain nested list.
    assert_png(fused_attn.plot.heatmap(probs[0, 0].bfloat16().requires_grad_(), tmp_path / "bf16.png"))
    assert_png(fused_attn.plot.heatmap([[0.5, 0.5], [1.0, 0.0]], str(tmp_path / "list.png")))


def test_received_writes_png_of_attention_stats(tmp_path, device):
    torch.manual_seed(0)
    q, k = torch.randn(1, 2, 12, 16).to(device), torch.randn(1, 2, 12, 16).to(device)
    stats = fused_attn.attention_stats(q, k, causal=True)
    path = fused_attn.plot.received(stats.received[0, 0], tmp_path / "received.png",
                                    labels=[f"w{i}" for i in range(12)], title="received")
    assert isinstance(path, Path)
    assert_png(path)
    assert_png(fused_attn.plot.received(stats.received[0, 1].double(), tmp_path / "plain.png", xlabel=None))


def test_long_axes_get_thinned_labels(tmp_path):
    probs = torch.softmax(torch.randn(80, 200), dim=-1)
    assert_png(fused_attn.plot.heatmap(probs, tmp_path / "big.png", row_labels=range(80), col_labels=range(200)))
    assert_png(fused_attn.plot.received(probs.sum(0), tmp_path / "bars.png", labels=range(200)))


@pytest.mark.parametrize("shape", [(5,), (2, 3, 4), ()])
def test_heatmap_rejects_wrong_dims(tmp_path, shape):
    with pytest.raises(ValueError, match=r"probs must be 2-D"):
        fused_attn.plot.heatmap(torch.rand(shape), tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("shape", [(2, 3), (1, 2, 3), ()])
def test_received_rejects_wrong_dims(tmp_path, shape):
    with pytest.raises(ValueError, match=r"values must be 1-D"):
        fused_attn.plot.received(torch.rand(shape), tmp_path / "x.png")


def test_label_counts_are_checked(tmp_path):
    probs = torch.rand(3, 4)
    with pytest.raises(ValueError, match=r"row_labels .* expected 3, got 4"):
        fused_attn.plot.heatmap(probs, tmp_path / "x.png", row_labels=list("abcd"))
    with pytest.raises(ValueError, match=r"col_labels .* expected 4, got 3"):
        fused_attn.plot.heatmap(probs, tmp_path / "x.png", col_labels=list("abc"))
    with pytest.raises(ValueError, match=r"col_labels .* single string"):
        fused_attn.plot.heatmap(probs, tmp_path / "x.png", col_labels="abcd")
    with pytest.raises(ValueError, match=r"labels .* expected 4, got 5"):
        fused_attn.plot.received(probs[0], tmp_path / "x.png", labels=list("abcde"))
    with pytest.raises(ValueError, match=r"probs must not be empty"):
        fused_attn.plot.heatmap(torch.rand(0, 4), tmp_path / "x.png")
    with pytest.raises(ValueError, match=r"values must be real"):
        fused_attn.plot.received(torch.ones(3, dtype=torch.bool), tmp_path / "x.png")
    with pytest.raises(TypeError, match=r"probs must be a torch.Tensor"):
        fused_attn.plot.heatmap(object(), tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_missing_matplotlib_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    with pytest.raises(ImportError, match=r'pip install "fused-attn\[plot\]"'):
        fused_attn.plot.heatmap(torch.rand(2, 2), tmp_path / "x.png")
    with pytest.raises(ImportError, match=r'pip install "fused-attn\[plot\]"'):
        fused_attn.plot.received(torch.rand(2), tmp_path / "x.png")


def test_pyplot_state_is_left_alone(tmp_path):
    import matplotlib
    backend = matplotlib.get_backend()
    fused_attn.plot.heatmap(torch.rand(3, 3), tmp_path / "x.png")
    assert matplotlib.get_backend() == backend
    if "matplotlib.pyplot" in sys.modules:
        assert sys.modules["matplotlib.pyplot"].get_fignums() == []


# ------------------------------------------------------------------------------------- example
def test_example_runs_end_to_end(example, tmp_path, capsys):
    result = example.main(["--steps", "5", "--out", str(tmp_path)])
    assert result["heatmap"] == tmp_path / "reverse_cross_attention.png"
    assert result["received"] == tmp_path / "reverse_received.png"
    for path in (result["heatmap"], result["received"]):
        assert_png(path)
        assert path.stat().st_size < 200_000
    assert result["max_error"] < 1e-4 and result["probs_error"] < 1e-4
    attn = result["attention"]
    length = example.LENGTH
    assert attn.probs.shape == (1, example.HEADS, length, length)
    torch.testing.assert_close(attn.probs.sum(-1), torch.ones(1, example.HEADS, length))
    torch.testing.assert_close(attn.stats.received.sum(-1), torch.full((1, example.HEADS), float(length)))
    printed = capsys.readouterr().out
    for expected in ("final loss", "held-out reversal accuracy", "anti-diagonal mass", "reverse_cross_attention.png"):
        assert expected in printed


def test_example_training_is_reproducible(example, one_cpu_thread):
    _, loss_a = example.train(steps=3, seed=7)
    _, loss_b = example.train(steps=3, seed=7)
    assert loss_a == loss_b


def test_trained_model_cross_attention_is_the_anti_diagonal(example, one_cpu_thread):
    """With the example's default training the model reverses held-out sequences, and its decoder
    cross-attention, read by attention_probs from the kernel's lse, puts most of each output row's
    mass on the source position that row copies. attention_probs equals the model's own softmax
    weights (float64), attention the model's SDPA output, attention_stats their column sums."""
    model, loss = example.train(example.STEPS, example.SEED)
    assert loss < 0.05
    token_accuracy, _ = example.accuracy(model, count=256)
    assert token_accuracy > 0.95

    sources = example.batch_of(3, torch.Generator().manual_seed(12345))[0]
    for src in sources:
        attn = example.cross_attention(model, src)
        torch.testing.assert_close(attn.output, src.flip(0))
        torch.testing.assert_close(attn.kernel_out, attn.model_out, atol=1e-5, rtol=1e-4)
        weights = example.float64_softmax(attn.q, attn.k)
        torch.testing.assert_close(attn.probs.double(), weights, atol=2e-6, rtol=1e-4)
        torch.testing.assert_close(attn.stats.received.double(), weights.sum(-2), atol=1e-5, rtol=1e-4)
        mass = example.anti_diagonal_mass(attn.probs[0].mean(0)).item()
        assert mass > 0.7, f"cross-attention of {src.tolist()} has only {mass:.2f} of its mass on the anti-diagonal"
        # The largest weight of each output row (head-averaged) is on the copied position.
        assert attn.probs[0].mean(0).argmax(-1).tolist() == list(range(example.LENGTH - 1, -1, -1))
