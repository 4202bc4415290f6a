"""The drafter's own KV cache (kept apart from mmspec.drafter, which re-exports it)."""

from __future__ import annotations

import torch
from torch import Tensor


class DraftKV:
    """The drafter's own KV cache: preallocated buffers that grow by doubling, cropped back after every draft."""

    def __init__(self) -> None:
        self.k: Tensor | None = None  # [B, kv_heads, capacity, head_dim]
        self.v: Tensor | None = None
        self.length = 0

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        n = k.shape[2]
        if self.k is None or self.length + n > self.k.shape[2]:
            cap = max(256, 2 * (self.length + n))
            new_k = k.new_zeros(k.shape[0], k.shape[1], cap, k.shape[3])
            new_v = torch.zeros_like(new_k)
            if self.k is not None:
                new_k[:, :, : self.length] = self.k[:, :, : self.length]
                new_v[:, :, : self.length] = self.v[:, :, : self.length]
            self.k, self.v = new_k, new_v
        self.k[:, :, self.length : self.length + n] = k
        self.v[:, :, self.length : self.length + n] = v
        self.length += n
        return self.k[:, :, : self.length], self.v[:, :, : self.length]

    def crop(self, length: int) -> None:
        self.length = min(self.length, length)
