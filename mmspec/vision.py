"""The ViSpec vision adaptor (Kang et al. 2025): what lets a one-layer drafter see the image cheaply.

Learned queries cross-attend over one image's tokens as the target embeds them (the projector outputs placed in the
language model's input embeddings). Of the `num_queries` outputs, the first `num_queries - 1` stand in for the image's
N tokens in the drafter's sequence, at the positions of the image's last tokens, so the text after the image keeps its
positions and the drafter's KV cache holds a handful of slots per image instead of hundreds. The last output is the
image's global vector, injected into every later position (see Drafter.inject).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import InputError


class VisionAdaptor(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, num_queries: int, eps: float = 1e-6) -> None:
        super().__init__()
        if num_queries < 2:
            raise InputError(f"num_queries must be >= 2 (slots plus one global vector), got {num_queries}")
        self.num_heads = num_heads
        self.queries = nn.Parameter(torch.randn(num_queries, hidden_size) * 0.02)
        self.norm = nn.RMSNorm(hidden_size, eps=eps)
        self.q_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.k_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.v_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.o_proj = nn.Linear(hidden_size, hidden_size, bias=False)

    @property
    def num_queries(self) -> int:
        return self.queries.shape[0]

    def forward(self, images: list[Tensor]) -> Tensor:
        """images: one [N_i, H] tensor per image -> [num_images, num_queries, H]."""
        if not images:
            return self.queries.new_zeros(0, self.num_queries, self.queries.shape[1])
        h, nh = self.queries.shape[1], self.num_heads
        n_max = max(im.shape[0] for im in images)
        x = torch.zeros(len(images), n_max, h, dtype=self.queries.dtype, device=self.queries.device)
        valid = torch.zeros(len(images), n_max, dtype=torch.bool, device=self.queries.device)
        for i, im in enumerate(images):
            x[i, : im.shape[0]] = im.to(x.dtype)
            valid[i, : im.shape[0]] = True
        x = self.norm(x)
        b = len(images)
        q = self.q_proj(self.queries).view(1, -1, nh, h // nh).transpose(1, 2).expand(b, -1, -1, -1)
        k = self.k_proj(x).view(b, n_max, nh, h // nh).transpose(1, 2)
        v = self.v_proj(x).view(b, n_max, nh, h // nh).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=valid[:, None, None, :])
        return self.o_proj(out.transpose(1, 2).reshape(b, -1, h))


@dataclass(frozen=True)
class CompressionPlan:
    """Which prompt tokens the drafter keeps, and what stands in for kept image tokens.

    keep:      [m] token indices kept (ascending); dropped ones are the leading tokens of each image
    slot:      [m] for a kept image token, the flat index image * (num_queries - 1) + q of the query output that
               replaces its embedding; -1 for text tokens
    image_of:  [m] the most recent image completed before each kept token (its global vector is injected), -1 if none
    spans:     [(start, end)] token index range of every image, in order
    """

    keep: Tensor
    slot: Tensor
    image_of: Tensor
    spans: tuple[tuple[int, int], ...]


def image_spans(input_ids: Tensor, image_token_id: int | None, n_images: int | None = None) -> list[tuple[int, int]]:
    """[start, end) token ranges of the images: maximal runs of the image token. When a template puts images back to
    back (fewer runs than `n_images`) and all images have the same token count, merged runs are split evenly; families
    whose images break into several runs (Pixtral rows) keep one span per run."""
    if image_token_id is None:
        return []
    is_img = (input_ids == image_token_id).cpu()
    if not bool(is_img.any()):
        return []
    edges = torch.diff(is_img.to(torch.int8), prepend=torch.zeros(1, dtype=torch.int8), append=torch.zeros(1, dtype=torch.int8))
    starts = (edges == 1).nonzero().flatten().tolist()
    ends = (edges == -1).nonzero().flatten().tolist()
    spans = list(zip(starts, ends))
    total = sum(e - s for s, e in spans)
    if n_images and len(spans) < n_images and total % n_images == 0:
        per = total // n_images
        if all((e - s) % per == 0 for s, e in spans):
            spans = [(a, a + per) for s, e in spans for a in range(s, e, per)]
    return spans


def plan_compression(
    input_ids: Tensor, image_token_id: int | None, num_queries: int, n_images: int | None = None, first: int = 1
) -> CompressionPlan:
    """Plan for tokens input_ids[first:] (the drafter reads token t_{j+1} with feature f_j, so token 0 is never read)."""
    n = input_ids.shape[0]
    spans = image_spans(input_ids, image_token_id, n_images)
    n_slots = num_queries - 1
    slot = torch.full((n,), -1, dtype=torch.long)
    keep_mask = torch.ones(n, dtype=torch.bool)
    image_of = torch.full((n,), -1, dtype=torch.long)
    for i, (s, e) in enumerate(spans):
        kept_from = max(s, e - n_slots)
        keep_mask[s:kept_from] = False
        # a short image keeps all its tokens; they take the last query outputs so the final slot is always query n-2
        slot[kept_from:e] = i * n_slots + torch.arange(n_slots - (e - kept_from), n_slots)
        image_of[e:] = i
    keep_mask[:first] = False
    keep = keep_mask.nonzero().flatten()
    return CompressionPlan(keep=keep, slot=slot[keep], image_of=image_of[keep], spans=tuple(spans))
