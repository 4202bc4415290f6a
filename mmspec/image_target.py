"""The target side of image generation: an AR image generator whose decoder takes prompt embeddings, then code
embeddings, and whose code logits come from a generation head (Janus family). Same interface as target.TargetRunner,
so the one generation loop (engine.decode) runs it unchanged: rows (cond, uncond) in one forward, a tree as a 4-D mask
plus position ids, and the same named cache edits."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers.cache_utils import Cache

from .target import Prefill, TreeMask, cache_kwarg, output_cache
from .tree import DraftTree


class ImageRunner:
    def __init__(self, model: nn.Module, adapter) -> None:
        self.model = model
        self.adapter = adapter
        self.decoder = adapter.decoder(model)
        self.head = adapter.code_head(model)
        self.embed_codes = adapter.code_embedding(model)
        self.device = self.embed_codes.weight.device
        self.max_context = int(getattr(self.decoder.config, "max_position_embeddings", 0) or 0)
        self.mask = TreeMask(self.decoder.config._attn_implementation, model.dtype, self.device)
        self.cache_kw = cache_kwarg(self.decoder)

    @torch.no_grad()
    def prefill(self, inputs: dict, want_hidden: bool, want_embeds: bool = False,
                positions: Tensor | None = None) -> Prefill:
        """The prompt rows' forward; the rows have one length (the uncond row pads in place), so no position ids."""
        embeds = self.adapter.embed_prompt(self.model, inputs["input_ids"])
        out = self.decoder(inputs_embeds=embeds, attention_mask=inputs.get("attention_mask"), use_cache=True,
                           output_hidden_states=want_hidden, return_dict=True)
        return Prefill(
            logits=self.head(out.last_hidden_state[:, -1]),
            hidden_states=tuple(out.hidden_states) if want_hidden else None,
            cache=output_cache(out),
            input_embeds=embeds if want_embeds else None,
        )

    @torch.no_grad()
    def verify(self, tree: DraftTree, cache: Cache, past: int, root_pos: Tensor, want_hidden: bool):
        """One decoder forward of every row over the tree of codes -> ([B, T, V] code logits, hidden states or None)."""
        rows = root_pos.shape[0]
        positions = (root_pos[:, None] + tree.depths[None]).to(self.device, non_blocking=True)
        embeds = self.embed_codes(tree.tokens)[None].expand(rows, -1, -1)
        out = self.decoder(
            inputs_embeds=embeds,
            attention_mask=self.mask.build(tree, past),
            position_ids=positions,
            use_cache=True,
            output_hidden_states=want_hidden,
            return_dict=True,
            **{self.cache_kw: cache},
        )
        self.mask.release(tree, past)
        return self.head(out.last_hidden_state), (tuple(out.hidden_states) if want_hidden else None)
