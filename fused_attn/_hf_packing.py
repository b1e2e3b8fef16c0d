"""Packed sequences found by transformers' mask builder, served without an S x S mask.

When a batch is packed by `position_ids` alone (DataCollatorWithFlattening's default: no
attention mask, positions restarting at 0 per sequence), transformers' causal-mask builders
detect the packing and hand the mask interface a mask function that ANDs the causal (or sliding
window) pattern with "same sequence"; SDPA's builder turns it into a dense (B, 1, S, S) bool
mask, 4 GiB at 64k tokens. `packed_mask` (the builder fused_attn registers) recognises that
exact mask function, records the O(B x S) sequence ids and the window for this forward, and
returns no mask; `recorded_packing` then gives the attention call the sequence boundaries, and
the call runs on `attention_varlen`, as transformers' flash path runs it.

It only does so for models whose attention layers hand the mask to the attention function
untouched (read from their source, as `fused_attn.hf.check_model_class` reads it): a model that
builds on the mask itself (Doge's dynamic mask selects its top-k keys among the visible ones)
would compute something else from no mask, so it gets the dense mask as before. Any mask
function this module does not recognise, a 2D padding mask, a cache or offsets: the dense mask.
"""
from __future__ import annotations

import ast
import contextvars
import functools
import importlib
import inspect
import textwrap
import weakref
from dataclasses import dataclass, field
from typing import Callable

import torch


@dataclass
class PackedForward:
    """The packing transformers' builder found in one forward of one model: `segments` (1, S)
    int64, equal within a sequence (`find_packed_sequence_indices`), and the windows of the masks
    it skipped (None: causal without a window; W: a sliding window of W keys). More than one
    window only for models whose layers name their window (`sliding_window=`) in every call."""
    config: weakref.ref
    segments: torch.Tensor
    windows: set[int | None] = field(default_factory=set)
    # Computed once per forward, not per layer: each costs a host sync on a GPU.
    _bounds: dict[torch.device, tuple[torch.Tensor, torch.Tensor, int, int]] = field(default_factory=dict)
    _checked_positions: object = None

    def window_for_layer(self) -> int | None:
        """The window of a layer that names none: the one mask kind skipped in this forward (PhiMoE's
        window lives only in its mask)."""
        return next(iter(self.windows)) if len(self.windows) == 1 else None

    def bounds(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        """(cu_seqlens_q, cu_seqlens_k, max_q, max_k) over the batch rows flattened, int32."""
        if device in self._bounds:
            return self._bounds[device]
        batch, seq = self.segments.shape
        ids = (self.segments + torch.arange(batch, device=self.segments.device)[:, None] * (seq + 1)).reshape(-1)
        starts = torch.nonzero(ids[1:] != ids[:-1]).reshape(-1) + 1
        cu = torch.cat([starts.new_zeros(1), starts, starts.new_full((1,), ids.numel())]).to(device, torch.int32)
        longest = int((cu[1:] - cu[:-1]).max())
        self._bounds[device] = cu, cu, longest, longest
        return self._bounds[device]


_PACKING: contextvars.ContextVar[PackedForward | None] = contextvars.ContextVar("fused_attn_packing", default=None)


def segments_from_positions(position_ids: torch.Tensor) -> torch.Tensor:
    """transformers' `find_packed_sequence_indices`: a new sequence wherever a position does not
    follow the one before it."""
    step = torch.diff(position_ids, prepend=position_ids[:, :1] - 1, dim=-1)
    return (step != 1).cumsum(-1)


def _closure(fn: Callable) -> dict[str, object]:
    cells = fn.__closure__ or ()
    return {name: cell.cell_contents for name, cell in zip(fn.__code__.co_freevars, cells)}


def _qualname(fn: object) -> str:
    return getattr(fn, "__qualname__", "")


def _causal_window(fn: Callable) -> tuple[bool, int | None]:
    """(True, None) for transformers' causal_mask_function, (True, W) for its sliding-window
    causal function, (False, None) for anything else."""
    from transformers import masking_utils

    if fn is masking_utils.causal_mask_function:
        return True, None
    if _qualname(fn) == "and_masks.<locals>.and_mask":
        parts = _closure(fn).get("mask_functions", ())
        if (len(parts) == 2 and parts[1] is masking_utils.causal_mask_function
                and _qualname(parts[0]) == "sliding_window_overlay.<locals>.inner_mask"):
            window = _closure(parts[0]).get("sliding_window")
            if isinstance(window, int) and window > 0:
                return True, window
    return False, None


def packed_pattern(mask_function: Callable) -> tuple[torch.Tensor, int | None] | None:
    """(segments, window) when `mask_function` is exactly what transformers' builder makes for a
    causal or sliding-window layer over packed sequences: and_masks(remap(causal pattern),
    same-sequence); None for anything else (extra and/or functions, chunked attention, ...)."""
    if _qualname(mask_function) != "and_masks.<locals>.and_mask":
        return None
    parts = _closure(mask_function).get("mask_functions", ())
    if len(parts) != 2 or _qualname(parts[1]) != "packed_sequence_mask_function.<locals>.inner_mask":
        return None
    if _qualname(parts[0]) != "remap_positions_for_packed_sequence.<locals>.inner_mask":
        return None
    causal, window = _causal_window(_closure(parts[0]).get("mask_function"))
    segments = _closure(parts[1]).get("packed_sequence_mask")
    if not causal or not isinstance(segments, torch.Tensor) or segments.dim() != 2:
        return None
    return segments, window


def _mentions_packing(mask_function: Callable, depth: int = 0) -> bool:
    """Whether transformers' same-sequence mask function appears anywhere in `mask_function`."""
    if _qualname(mask_function) == "packed_sequence_mask_function.<locals>.inner_mask":
        return True
    if depth > 8 or not callable(mask_function) or not hasattr(mask_function, "__code__"):
        return False
    for value in _closure(mask_function).values():
        for item in (value if isinstance(value, (tuple, list)) else (value,)):
            if callable(item) and _mentions_packing(item, depth + 1):
                return True
    return False


@functools.lru_cache(maxsize=None)
def mask_handling(config_class: type) -> tuple[bool, bool]:
    """(passes the mask through, names the window) for the attention layers of the config's
    modeling file: in every forward that calls the attention interface, `attention_mask` is read
    only as an argument of that call and never assigned; and every such call passes
    `sliding_window=`. Unreadable source: (False, False)."""
    module_name = config_class.__module__.replace(".configuration_", ".modeling_")
    try:
        tree = ast.parse(inspect.getsource(importlib.import_module(module_name)))
    except (ImportError, OSError, TypeError, SyntaxError):
        return False, False
    passes, names_window, found = True, True, False
    for node in ast.walk(tree):
        if not isinstance(node, ast.FunctionDef) or node.name != "forward":
            continue
        calls = [call for call in ast.walk(node) if isinstance(call, ast.Call)
                 and any(name in ast.unparse(call.func) for name in ("attention_interface", "ALL_ATTENTION_FUNCTIONS"))]
        calls = [call for call in calls if "get_interface" not in ast.unparse(call.func)]  # the lookup, not the call
        if not calls:
            continue
        found = True
        handed = {id(arg) for call in calls for arg in [*call.args, *(kw.value for kw in call.keywords)]
                  if isinstance(arg, ast.Name) and arg.id == "attention_mask"}
        uses = [name for name in ast.walk(node) if isinstance(name, ast.Name) and name.id == "attention_mask"]
        if not handed or any(isinstance(name.ctx, ast.Store) or id(name) not in handed for name in uses):
            passes = False
        if not all(any(kw.arg == "sliding_window" for kw in call.keywords) for call in calls):
            names_window = False
    return passes and found, names_window and found


def packed_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
                mask_function: Callable | None = None, attention_mask: torch.Tensor | None = None,
                **kwargs) -> torch.Tensor | None:
    """The mask builder registered for "fused_attn": transformers' SDPA builder, except that
    packing by position_ids (see the module docstring) is recorded instead of materialised."""
    from transformers.masking_utils import causal_mask_function, sdpa_mask

    mask_function = mask_function if mask_function is not None else causal_mask_function
    config = kwargs.get("config")
    packed = None
    if (attention_mask is None and batch_size == 1 and q_offset == 0 and kv_offset == 0 and q_length == kv_length
            and config is not None):
        packed = packed_pattern(mask_function)
    passes, names_window = mask_handling(type(config)) if packed is not None else (False, False)
    if not passes:
        record = _PACKING.get()
        if not _mentions_packing(mask_function) or (record is not None and record.config() is not config):
            _PACKING.set(None)  # a forward without packing, or another model's: nothing recorded may outlive it
        # else: a packed mask of another kind in the same forward (built densely below); the layers
        # whose masks were recorded still get none and read the record.
    else:
        segments, window = packed
        record = _PACKING.get()
        same = (record is not None and record.config() is config and record.segments.shape == segments.shape
                and torch.equal(record.segments, segments))
        if not same:
            record = PackedForward(weakref.ref(config), segments)
            _PACKING.set(record)
        # A layer that names no window takes the recorded one, so a second kind of mask in the same
        # forward is built densely (those layers get it) unless every layer names its window.
        if names_window or not record.windows or record.windows == {window}:
            record.windows.add(window)
            return None
    return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                     kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask, **kwargs)


def recorded_packing(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                     kwargs: dict) -> PackedForward | None:
    """The packing `packed_mask` recorded for this model's current forward, when this call (no
    mask, as many keys as queries) is one of its attention calls; raises when the call's own
    position_ids say otherwise (a forward recomputed after another one changed the record)."""
    record = _PACKING.get()
    if record is None:
        return None
    config = record.config()
    module_config = getattr(module, "config", None)
    if config is None or (module_config is not None and module_config is not config):
        return None
    batch, seq = record.segments.shape
    if query.shape[0] != batch or query.shape[2] != seq or key.shape[2] != seq:
        return None
    position_ids = kwargs.get("position_ids")
    if (isinstance(position_ids, torch.Tensor) and position_ids.dim() == 2 and position_ids.shape[-1] == seq
            and position_ids is not record._checked_positions):  # the layers of a forward share one tensor
        segments = segments_from_positions(position_ids.expand(batch, -1).to(record.segments.device))
        if not torch.equal(segments, record.segments):
            raise NotImplementedError("fused_attn: this attention call's position_ids pack sequences differently "
                                      "from what the mask builder recorded for the forward; pass cu_seq_lens_q/k "
                                      "(DataCollatorWithFlattening(return_flash_attn_kwargs=True)) or an explicit mask")
        record._checked_positions = position_ids
    return record
