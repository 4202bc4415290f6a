"""Frozen configuration objects: the draft-tree shape and the sampling warp.

Both validate on construction, so a bad value fails where the user wrote it with a message that names the field and the
allowed range, never later inside a torch kernel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from .errors import InputError


@dataclass(frozen=True)
class TreeConfig:
    """Shape of the EAGLE-2 dynamic draft tree.

    depth:        drafter forwards per step, so the longest path holds `depth` drafted tokens.
    top_k:        children proposed per expanded node, and the beam width kept at every depth.
    total_tokens: tokens the target verifies per step, the root (last committed token) included; 1 means plain
                  autoregressive decoding.
    min_confidence: drafting stops before `depth` once the best path's draft probability falls below this: a deeper
                  node is accepted at most about that often (the drafter's confidence tracks acceptance, EAGLE-2), so
                  on a machine where a drafter forward is dear it costs more than it brings. 0 always drafts `depth`.
    """

    depth: int = 5
    top_k: int = 8
    total_tokens: int = 32
    min_confidence: float = 0.0

    def __post_init__(self) -> None:
        c = self.min_confidence
        if isinstance(c, bool) or not isinstance(c, (int, float)) or not 0 <= c < 1:
            raise InputError(f"TreeConfig.min_confidence must be a number in [0, 1), got {c!r}")
        for f in fields(self):
            if f.name == "min_confidence":
                continue
            value = getattr(self, f.name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InputError(f"TreeConfig.{f.name} must be a positive integer, got {value!r}")
        if self.total_tokens > self.max_nodes + 1:
            raise InputError(
                f"TreeConfig.total_tokens={self.total_tokens} exceeds the {self.max_nodes + 1} nodes a tree of "
                f"depth={self.depth}, top_k={self.top_k} can hold (root included); lower total_tokens or raise depth/top_k"
            )

    @property
    def max_nodes(self) -> int:
        """Drafted candidates per step: top_k at depth 1, then top_k**2 per further depth (EAGLE-2 beam)."""
        return self.top_k + (self.depth - 1) * self.top_k * self.top_k

    @classmethod
    def preset(cls, name: str) -> "TreeConfig":
        """Named shapes: `cpu` is small because a CPU pays for every verified token; `gpu` follows EAGLE-2's defaults;
        `auto` is measured for the target, drafter and machine when `mmspec.load` gets it (see mmspec.autotune)."""
        if name not in TREE_PRESETS:
            raise InputError(f"unknown tree preset {name!r}; choose one of {sorted(TREE_PRESETS)}")
        return TREE_PRESETS[name]


@dataclass(frozen=True)
class AutoTreeConfig(TreeConfig):
    """`TreeConfig.preset("auto")`: the shape measured fastest for the pipeline, cached per target, drafter and machine:
    `mmspec.load` measures a text or VLM target's at once (mmspec.autotune), an image generator's per acceptance rule
    on first use (mmspec.image_autotune). Where nothing measures it (a pipeline built by hand, with no tuner) it is the
    `cpu` shape it was built with."""


TREE_PRESETS = {
    "auto": AutoTreeConfig(depth=5, top_k=4, total_tokens=16),
    "chain": TreeConfig(depth=4, top_k=1, total_tokens=5),
    "cpu": TreeConfig(depth=5, top_k=4, total_tokens=16),
    "default": TreeConfig(),
    "gpu": TreeConfig(depth=6, top_k=10, total_tokens=60),
}


@dataclass(frozen=True)
class SamplingConfig:
    """How the target's next-token logits become a distribution; the same warp as transformers' generate applies
    (temperature, then top_k, then top_p). temperature == 0 means greedy."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise InputError(f"temperature must be a finite number >= 0 (0 means greedy), got {t!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise InputError(f"top_k must be an integer >= 0 (0 disables it), got {self.top_k!r}")
        p = self.top_p
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not (0 < p <= 1):
            raise InputError(f"top_p must be in (0, 1] (1 disables it), got {p!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def check_max_new_tokens(n: object) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise InputError(f"max_new_tokens must be a positive integer, got {n!r}")
    return n


SEED_LIMIT = 2**64  # torch.Generator.manual_seed takes an unsigned 64-bit seed; past it torch overflows


def check_seed(seed: object) -> int | None:
    """None, or an integer in [0, 2**64): what a torch.Generator can be seeded with."""
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_LIMIT:
        raise InputError(f"seed must be an integer in [0, 2**64) or None, got {seed!r}")
    return seed


def seeded_generator(device, seed: int | None):
    """The one torch.Generator a generation draws from, seeded with `seed`. seed=None draws the seed from torch's
    global generator, as transformers' generate samples from it: `torch.manual_seed(s)` then fixes the output too."""
    import torch

    seed = check_seed(seed)
    if seed is None:
        seed = int(torch.randint(0, 2**62, ()))  # a CPU draw: no device sync
    return torch.Generator(device=device).manual_seed(seed)
