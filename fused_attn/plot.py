"""PNG pictures of where attention goes: a heat map of a slice of the attention map and a bar chart of
the attention each key receives. Made for the outputs of `fused_attn.attention_probs` and
`fused_attn.attention_stats`::

    out, lse = fused_attn.attention(q, k, v, return_lse=True)
    probs = fused_attn.attention_probs(q, k, lse, heads=[0])      # (B, 1, Sq, Sk)
    fused_attn.plot.heatmap(probs[0, 0], "attn.png")
    stats = fused_attn.attention_stats(q, k)
    fused_attn.plot.received(stats.received[0, 0], "received.png")

matplotlib is optional (``pip install "fused-attn[plot]"``) and imported only when a function is
called. The figures are drawn on matplotlib's Agg canvas directly, never through pyplot, so this
works headless and leaves the caller's pyplot backend and open figures alone.
"""
from __future__ import annotations

import os
import textwrap
from pathlib import Path
from typing import Any, Sequence

import torch

__all__ = ["heatmap", "received"]

_INSTALL_HINT = 'fused_attn.plot needs matplotlib: pip install "fused-attn[plot]"'


def _figure(width: float, height: float) -> tuple[Any, Any]:
    """A matplotlib Figure on an Agg canvas (no pyplot, no GUI), and the canvas."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(_INSTALL_HINT) from error
    figure = Figure(figsize=(width, height), dpi=100)
    return figure, FigureCanvasAgg(figure)


def _as_matrix(name: str, values: Any, dims: int) -> torch.Tensor:
    """`values` as a float64 CPU tensor with `dims` dimensions, or a ValueError naming `name`."""
    if not isinstance(values, torch.Tensor):
        try:
            values = torch.as_tensor(values)
        except (TypeError, ValueError, RuntimeError) as error:
            raise TypeError(f"{name} must be a torch.Tensor (or array-like), got {type(values).__name__}") from error
    if values.dim() != dims:
        shape = "(rows, keys)" if dims == 2 else "(keys,)"
        raise ValueError(f"{name} must be {dims}-D {shape}, got shape {tuple(values.shape)}")
    if values.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(values.shape)}")
    if values.is_complex() or values.dtype == torch.bool:
        raise ValueError(f"{name} must be real numbers, got {str(values.dtype).replace('torch.', '')}")
    return values.detach().to(device="cpu", dtype=torch.float64)


def _labels(name: str, labels: Sequence[Any] | None, count: int, axis: str) -> list[str] | None:
    if labels is None:
        return None
    if isinstance(labels, (str, bytes)):
        raise ValueError(f"{name} must be a sequence of {count} labels, one per {axis}, got a single string")
    labels = [str(label) for label in labels]
    if len(labels) != count:
        raise ValueError(f"{name} must have one label per {axis}: expected {count}, got {len(labels)}")
    return labels


def _ticks(axis: Any, which: str, labels: list[str] | None, count: int) -> None:
    """Put every label on the axis (or every index when there are none and few enough)."""
    set_ticks = axis.set_xticks if which == "x" else axis.set_yticks
    if labels is None:
        if count <= 32:
            set_ticks(range(count))
        return
    step = max(1, -(-count // 64))  # at most ~64 labels on an axis stay readable
    positions = list(range(0, count, step))
    set_ticks(positions)
    texts = [labels[i] for i in positions]
    if which == "x":
        axis.set_xticklabels(texts, rotation=90 if max(map(len, texts)) > 2 else 0, fontsize=8)
    else:
        axis.set_yticklabels(texts, fontsize=8)


def _decorate(figure: Any, axis: Any, title: str | None, xlabel: str | None, ylabel: str | None) -> None:
    if xlabel:
        axis.set_xlabel(xlabel)
    if ylabel:
        axis.set_ylabel(ylabel)
    if title:
        # Wrap to the figure's width (about 13 characters an inch at this size), keeping given line breaks.
        width = max(20, int(figure.get_figwidth() * 13))
        lines = [wrapped for line in str(title).splitlines() for wrapped in (textwrap.wrap(line, width) or [""])]
        axis.set_title("\n".join(lines), fontsize=10)


def _save(figure: Any, canvas: Any, path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    canvas.print_png(str(path))
    return path


def heatmap(probs: torch.Tensor, path: str | os.PathLike[str], *, row_labels: Sequence[Any] | None = None,
            col_labels: Sequence[Any] | None = None, title: str | None = None, xlabel: str | None = "key",
            ylabel: str | None = "query") -> Path:
    """Write a PNG heat map of a 2-D slice of an attention map and return its path.

    Args:
        probs: (rows, keys) probabilities, e.g. one batch element and head of
            `fused_attn.attention_probs(...)`: ``probs[0, 0]``. Any device and floating dtype.
        path: where the PNG goes (parent folders are created).
        row_labels: optional, one label per row (query tokens), shown on the y axis.
        col_labels: optional, one label per key (key tokens), shown on the x axis.
        title: optional figure title (wrapped to the figure's width).
        xlabel, ylabel: axis titles (None for none).

    Raises:
        ValueError: `probs` is not 2-D, or a label list does not match its dimension.
        ImportError: matplotlib is not installed.
    """
    matrix = _as_matrix("probs", probs, 2)
    rows, keys = matrix.shape
    row_labels = _labels("row_labels", row_labels, rows, "row of probs")
    col_labels = _labels("col_labels", col_labels, keys, "key (column) of probs")
    figure, canvas = _figure(min(12.0, max(4.5, 2.0 + 0.32 * keys)), min(12.0, max(3.5, 1.5 + 0.32 * rows)))
    axis = figure.add_subplot()
    image = axis.imshow(matrix.numpy(), cmap="viridis", aspect="auto", interpolation="nearest",
                        vmin=0.0, vmax=max(float(matrix.max()), 1e-12))
    figure.colorbar(image, ax=axis, fraction=0.046, pad=0.04, label="probability")
    _ticks(axis, "x", col_labels, keys)
    _ticks(axis, "y", row_labels, rows)
    _decorate(figure, axis, title, xlabel, ylabel)
    return _save(figure, canvas, path)


def received(values: torch.Tensor, path: str | os.PathLike[str], *, labels: Sequence[Any] | None = None,
             title: str | None = None, xlabel: str | None = "key", ylabel: str | None = "attention received"
             ) -> Path:
    """Write a PNG bar chart of the attention each key receives and return its path.

    Args:
        values: (keys,) attention received per key, e.g. ``fused_attn.attention_stats(q, k)
            .received[0, h]`` (the sum over queries of each query's probability for that key).
            Any device and floating dtype.
        path: where the PNG goes (parent folders are created).
        labels: optional, one label per key (key tokens), shown on the x axis.
        title: optional figure title (wrapped to the figure's width).
        xlabel, ylabel: axis titles (None for none).

    Raises:
        ValueError: `values` is not 1-D, or `labels` does not have one label per key.
        ImportError: matplotlib is not installed.
    """
    vector = _as_matrix("values", values, 1)
    keys = vector.shape[0]
    labels = _labels("labels", labels, keys, "key of values")
    figure, canvas = _figure(min(14.0, max(5.0, 2.5 + 0.35 * keys)), 3.4)
    axis = figure.add_subplot()
    axis.bar(range(keys), vector.numpy(), color="tab:blue", width=0.8)
    _ticks(axis, "x", labels, keys)
    axis.set_xlim(-0.6, keys - 0.4)
    axis.grid(axis="y", alpha=0.3)
    _decorate(figure, axis, title, xlabel, ylabel)
    return _save(figure, canvas, path)
