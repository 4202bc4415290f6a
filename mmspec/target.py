"""The target side of the loop: prefill, one-forward tree verification, and named edits of the transformers KV cache.

The target is the user's unmodified transformers model. A tree goes through its normal forward as a 4-D attention mask
(causal prefix + ancestor mask) plus explicit position ids (3-D for M-RoPE); nothing in transformers is patched.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers.cache_utils import Cache, DynamicLayer

from .errors import InputError
from .tree import DraftTree


def cache_keep(cache: Cache, start: int, keep: Tensor) -> None:
    """After a tree forward appended T nodes at [start, start + T), keep nodes `keep` (ascending tree indices, the root
    first) at [start, start + len(keep)) and drop the rest, in every layer."""
    n = keep.numel()
    prefix = bool((keep == torch.arange(n)).all())  # a chain accepted from the root needs no copy
    for layer in cache.layers:
        if type(layer) is not DynamicLayer:
            raise InputError(
                f"tree verification supports the full-attention DynamicCache only, got a {type(layer).__name__} (a "
                f"sliding-window or hybrid target); mmspec cannot crop it to an accepted path"
            )
        if not prefix:
            idx = (start + keep).to(layer.keys.device)
            layer.keys[:, :, start : start + n] = layer.keys[:, :, idx]
            layer.values[:, :, start : start + n] = layer.values[:, :, idx]
        layer.keys = layer.keys[:, :, : start + n]
        layer.values = layer.values[:, :, : start + n]


@dataclass
class Prefill:
    logits: Tensor  # [B, V] at every row's last prompt position ([n, V] of row 0 with all_logits)
    hidden_states: tuple[Tensor, ...] | None  # each [B, n, H]
    cache: Cache | None
    input_embeds: Tensor | None = None  # [B, n, H] what the language model received (image tokens = projector out)


def language_model(model: nn.Module) -> nn.Module:
    """The decoder that receives the merged text + image embeddings."""
    core = getattr(model, "model", model)
    return getattr(core, "language_model", None) or core


@functools.lru_cache(maxsize=64)
def _forward_params(forward_fn) -> frozenset[str]:
    return frozenset(inspect.signature(forward_fn).parameters)


def forward_params(model: nn.Module) -> frozenset[str]:
    """The keyword names the model's forward takes (looked up once per class: inspect is slow on the hot path)."""
    return _forward_params(type(model).forward)


def cache_kwarg(model: nn.Module) -> str:
    """The name the installed transformers gives the KV-cache argument: `cache` from 5.2x on (`past_key_values` still
    works there but warns on every call), `past_key_values` before."""
    return "cache" if "cache" in forward_params(model) else "past_key_values"


def output_cache(out) -> Cache | None:
    return out["cache"] if "cache" in out else out.get("past_key_values")


@torch.no_grad()
def target_forward(model: nn.Module, inputs: dict, *, want_hidden: bool, want_embeds: bool, all_logits: bool,
                   use_cache: bool = True, position_ids: Tensor | None = None) -> Prefill:
    """The target's normal forward over a prompt, optionally capturing its language model's input embeddings through a
    forward pre-hook (the generic way to see the projector outputs without knowing the family)."""
    captured: dict[str, Tensor] = {}

    def grab(_module, args, kwargs):
        emb = kwargs.get("inputs_embeds")
        if emb is not None:
            captured["embeds"] = emb

    hook = language_model(model).register_forward_pre_hook(grab, with_kwargs=True) if want_embeds else None
    extra = {} if all_logits or "logits_to_keep" not in forward_params(model) else {"logits_to_keep": 1}
    if position_ids is not None:
        extra["position_ids"] = position_ids
    try:
        out = model(**inputs, use_cache=use_cache, output_hidden_states=want_hidden, return_dict=True, **extra)
    finally:
        if hook is not None:
            hook.remove()
    embeds = captured.get("embeds")
    if want_embeds and embeds is None:
        raise InputError(
            f"{type(model).__name__} does not pass inputs_embeds to its language model, so the drafter's vision adaptor "
            f"cannot see the image embeddings; use a drafter without a vision adaptor (--no-vision-adaptor)"
        )
    return Prefill(
        logits=out.logits[0] if all_logits else out.logits[:, -1],
        hidden_states=tuple(out.hidden_states) if want_hidden else None,
        cache=output_cache(out) if use_cache else None,
        input_embeds=embeds,
    )


class TreeMask:
    """A reused [B, rows, columns] mask buffer in the layout the model's attention wants: bool (True = attend) for
    sdpa, additive float (0 / dtype min) for eager, which adds the mask to its scores and would silently ignore a bool
    one. Each row's left padding stays masked; each step writes the tree block, then restores it to 'attend' so the
    committed prefix never needs rewriting."""

    def __init__(self, attn_impl: str, dtype: torch.dtype, device: torch.device) -> None:
        if attn_impl not in ("sdpa", "eager"):
            raise InputError(
                f"tree verification needs attn_implementation 'sdpa' or 'eager' (a custom 4-D mask), the target uses "
                f"{attn_impl!r}; load it with attn_implementation='sdpa'"
            )
        self.bool_mask = attn_impl == "sdpa"
        self.dtype, self.device = dtype, device
        self.attend = True if self.bool_mask else 0.0
        self.blocked = False if self.bool_mask else torch.finfo(dtype).min
        self.pads = [0]
        self.buf = self._alloc(64, 1024)

    def start(self, pads: list[int]) -> None:
        """A new run whose rows have `pads` left-padding columns each; the buffer is kept when its row count fits."""
        old, self.pads = self.pads, list(pads)
        if len(old) != len(pads):
            self.buf = self._alloc(64, 1024)
        elif old != self.pads:
            self.buf[:, :, : max(old)] = self.attend
            self._block_pads(self.buf)

    def _block_pads(self, buf: Tensor) -> Tensor:
        for b, pad in enumerate(self.pads):
            buf[b, :, :pad] = self.blocked
        return buf

    def _alloc(self, rows: int, cols: int) -> Tensor:
        dtype = torch.bool if self.bool_mask else self.dtype
        return self._block_pads(torch.full((len(self.pads), rows, cols), self.attend, dtype=dtype, device=self.device))

    def build(self, tree: DraftTree, past: int) -> Tensor:
        t = tree.size
        if t > self.buf.shape[1] or past + t > self.buf.shape[2]:
            self.buf = self._alloc(max(t, self.buf.shape[1]), 2 * (past + t))
        block = tree.mask if self.bool_mask else torch.where(tree.mask, 0.0, self.blocked).to(self.dtype)
        self.buf[:, :t, past : past + t] = block
        return self.buf[:, None, :t, : past + t]

    def release(self, tree: DraftTree, past: int) -> None:
        self.buf[:, : tree.size, past : past + tree.size] = self.attend


class TargetRunner:
    def __init__(self, model: nn.Module, adapter) -> None:
        self.model = model
        self.adapter = adapter
        self.device = model.get_output_embeddings().weight.device
        text_cfg = model.config.get_text_config()
        self.max_context = int(getattr(text_cfg, "max_position_embeddings", 0) or 0)
        self.mask = TreeMask(model.config._attn_implementation, model.dtype, self.device)
        self.cache_kw = cache_kwarg(model)

    def prefill(self, inputs: dict, want_hidden: bool, want_embeds: bool = False,
                positions: Tensor | None = None) -> Prefill:
        """The prompt's forward; `positions` [B, n] (from the adapter's row_positions) are passed for left-padded rows."""
        position_ids = None
        mask = inputs.get("attention_mask")
        if positions is not None and mask is not None and not bool(mask.all()):
            position_ids = self.adapter.prefill_position_ids(inputs, positions)
        return target_forward(self.model, inputs, want_hidden=want_hidden, want_embeds=want_embeds, all_logits=False,
                              position_ids=position_ids)

    @torch.no_grad()
    def verify(self, tree: DraftTree, cache: Cache, past: int, root_pos: Tensor, want_hidden: bool):
        """One target forward of every row over the tree; root_pos [B] long (CPU) is each row's root position.
        Returns ([B, T, V] logits, hidden states each [B, T, H] or None)."""
        positions = (root_pos[:, None] + tree.depths[None]).to(self.device, non_blocking=True)
        rows = root_pos.shape[0]
        out = self.model(
            input_ids=tree.tokens[None].expand(rows, -1),
            attention_mask=self.mask.build(tree, past),
            position_ids=self.adapter.position_ids(positions),
            use_cache=True,
            output_hidden_states=want_hidden,
            return_dict=True,
            **{self.cache_kw: cache},
        )
        self.mask.release(tree, past)
        return out.logits, (tuple(out.hidden_states) if want_hidden else None)
