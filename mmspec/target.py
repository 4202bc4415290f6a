"""The target side of the loop: prefill, one-forward tree verification, and named edits of the transformers KV cache.

The target is the user's unmodified transformers model. A tree goes through its normal forward as a 4-D attention mask
(causal prefix + ancestor mask) plus explicit position ids (3-D for M-RoPE); nothing in transformers is patched.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers.cache_utils import Cache, DynamicLayer

from .tree import DraftTree


def cache_keep(cache: Cache, start: int, keep: Tensor) -> None:
    """After a tree forward appended T nodes at [start, start + T), keep nodes `keep` (ascending tree indices, the root
    first) at [start, start + len(keep)) and drop the rest, in every layer."""
    n = keep.numel()
    prefix = bool((keep == torch.arange(n)).all())  # a chain accepted from the root needs no copy
    for layer in cache.layers:
        if type(layer) is not DynamicLayer:
            raise NotImplementedError(
                f"tree verification supports the full-attention DynamicCache only, got a {type(layer).__name__}"
            )
        if not prefix:
            idx = (start + keep).to(layer.keys.device)
            layer.keys[:, :, start : start + n] = layer.keys[:, :, idx]
            layer.values[:, :, start : start + n] = layer.values[:, :, idx]
        layer.keys = layer.keys[:, :, : start + n]
        layer.values = layer.values[:, :, : start + n]


@dataclass
class Prefill:
    logits: Tensor  # [V] at the last prompt position ([n, V] with all_logits)
    hidden_states: tuple[Tensor, ...] | None  # each [1, n, H]
    cache: Cache | None
    input_embeds: Tensor | None = None  # [1, n, H] what the language model received (image tokens = projector out)


def language_model(model: nn.Module) -> nn.Module:
    """The decoder that receives the merged text + image embeddings."""
    core = getattr(model, "model", model)
    return getattr(core, "language_model", None) or core


@torch.no_grad()
def target_forward(model: nn.Module, inputs: dict, *, want_hidden: bool, want_embeds: bool, all_logits: bool,
                   use_cache: bool = True) -> Prefill:
    """The target's normal forward over a prompt, optionally capturing its language model's input embeddings through a
    forward pre-hook (the generic way to see the projector outputs without knowing the family)."""
    captured: dict[str, Tensor] = {}

    def grab(_module, args, kwargs):
        emb = kwargs.get("inputs_embeds")
        if emb is not None:
            captured["embeds"] = emb

    hook = language_model(model).register_forward_pre_hook(grab, with_kwargs=True) if want_embeds else None
    extra = {} if all_logits or "logits_to_keep" not in inspect.signature(model.forward).parameters else {"logits_to_keep": 1}
    try:
        out = model(**inputs, use_cache=use_cache, output_hidden_states=want_hidden, return_dict=True, **extra)
    finally:
        if hook is not None:
            hook.remove()
    embeds = captured.get("embeds")
    if want_embeds and embeds is None:
        embeds = model.get_input_embeddings()(inputs["input_ids"])
    return Prefill(
        logits=out.logits[0] if all_logits else out.logits[0, -1],
        hidden_states=tuple(out.hidden_states) if want_hidden else None,
        cache=out.past_key_values if use_cache else None,
        input_embeds=embeds,
    )


class TreeMask:
    """A reused [rows, columns] mask buffer in the layout the model's attention wants: bool (True = attend) for sdpa,
    additive float (0 / dtype min) for eager. Each step writes the tree block, then restores it to 'attend' so the
    committed prefix never needs rewriting."""

    def __init__(self, attn_impl: str, dtype: torch.dtype, device: torch.device) -> None:
        if attn_impl not in ("sdpa", "eager"):
            raise ValueError(
                f"tree verification needs attn_implementation 'sdpa' or 'eager' (a custom 4-D mask), the target uses "
                f"{attn_impl!r}; load it with attn_implementation='sdpa'"
            )
        self.bool_mask = attn_impl == "sdpa"
        self.dtype, self.device = dtype, device
        self.buf = self._alloc(64, 1024)

    def _alloc(self, rows: int, cols: int) -> Tensor:
        if self.bool_mask:
            return torch.ones(rows, cols, dtype=torch.bool, device=self.device)
        return torch.zeros(rows, cols, dtype=self.dtype, device=self.device)

    def build(self, tree: DraftTree, past: int) -> Tensor:
        t = tree.size
        if t > self.buf.shape[0] or past + t > self.buf.shape[1]:
            self.buf = self._alloc(max(t, self.buf.shape[0]), 2 * (past + t))
        block = tree.mask if self.bool_mask else torch.zeros((), dtype=self.dtype, device=self.device).masked_fill(
            ~tree.mask, torch.finfo(self.dtype).min
        )
        self.buf[:t, past : past + t] = block
        return self.buf[None, None, :t, : past + t]

    def release(self, tree: DraftTree, past: int) -> None:
        self.buf[: tree.size, past : past + tree.size] = True if self.bool_mask else 0


class TargetRunner:
    def __init__(self, model: nn.Module, adapter) -> None:
        self.model = model
        self.adapter = adapter
        self.device = model.get_output_embeddings().weight.device
        text_cfg = model.config.get_text_config()
        self.max_context = int(getattr(text_cfg, "max_position_embeddings", 0) or 0)
        self.mask = TreeMask(model.config._attn_implementation, model.dtype, self.device)

    def prefill(self, inputs: dict, want_hidden: bool, want_embeds: bool = False) -> Prefill:
        return target_forward(self.model, inputs, want_hidden=want_hidden, want_embeds=want_embeds, all_logits=False)

    @torch.no_grad()
    def verify(self, tree: DraftTree, cache: Cache, past: int, root_pos: int, want_hidden: bool):
        """One target forward over the tree. Returns ([T, V] logits, hidden states or None)."""
        positions = (root_pos + tree.depths).to(self.device, non_blocking=True)
        out = self.model(
            input_ids=tree.tokens[None],
            attention_mask=self.mask.build(tree, past),
            position_ids=self.adapter.position_ids(positions),
            past_key_values=cache,
            use_cache=True,
            output_hidden_states=want_hidden,
            return_dict=True,
        )
        self.mask.release(tree, past)
        return out.logits[0], (tuple(out.hidden_states) if want_hidden else None)
