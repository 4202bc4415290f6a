"""Acceptance rules: small frozen objects that say how much target mass stands in for a drafted token when it is tested.

The sibling recursion in `verify.accept_sampling` is the one place that decides; a rule only answers, for a drafted
token x at a node whose (residual) target distribution is p, which tokens A(x) it may claim:

- `relaxed_set(target_probs, token, neighbours)` -> [m] long, A(x) for one row [V] and one drafted token [1], x first;
- `relaxed_mass(target_probs, tokens, neighbours)` -> [N], the mass p(A(x)) that stands in for p(x) in the test.

After a rejection the residual removes exactly A(x). `Exact` claims A(x) = {x}: standard, lossless speculative sampling.
Relaxed rules (LANTERN) claim a few latent-space neighbours of x as well and only make sense for image-code targets:
`neighbours` [V, k'] lists each code's nearest other codes, nearest first (ImagePipeline.neighbours).

Greedy decoding (temperature 0) with a relaxed rule: the target's choice at a node is its top token y; a drafted x is
accepted when its relaxed mass on the softmax of the same logits is at least p(y), p~(x) >= p(y). With nothing claimed
(delta = 0, lam = 1) that is x = argmax, the exact greedy rule; see verify.accept_relaxed_greedy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from .errors import InputError, InputTypeError


@dataclass(frozen=True)
class Exact:
    """Lossless: a drafted token is tested against the target's own probability of it."""

    relaxed = False  # True for rules that change the output distribution (refused on text targets)
    k = 0  # reads no neighbours

    def relaxed_set(self, target_probs: Tensor, token: Tensor, neighbours: Tensor | None = None) -> Tensor:
        """target_probs [V], token [1] long -> [1]: the token alone."""
        return token

    def relaxed_mass(self, target_probs: Tensor, tokens: Tensor, neighbours: Tensor | None = None) -> Tensor:
        """target_probs [N, V], tokens [N] -> [N]: p(x)."""
        return target_probs.gather(1, tokens.reshape(-1, 1).to(target_probs.device))[:, 0]


EXACT = Exact()


class AcceptanceRule(Protocol):
    """Everything the engine reads of an acceptance rule (`acceptance=` takes any object that has it): `Exact`,
    `Lantern`, `LanternPP` or a rule of your own. `relaxed`: it changes the output distribution (refused on text
    targets); `k`: the neighbours per code it reads from the table (a relaxed rule, >= 1; 0 reads none)."""

    relaxed: bool
    k: int

    def relaxed_set(self, target_probs: Tensor, token: Tensor, neighbours: Tensor | None = None) -> Tensor: ...

    def relaxed_mass(self, target_probs: Tensor, tokens: Tensor, neighbours: Tensor | None = None) -> Tensor: ...


RULE_METHODS = ("relaxed_set", "relaxed_mass")


def check_rule(rule: object) -> AcceptanceRule:
    """The rule, when it has all of AcceptanceRule, else a one-line error naming what it lacks."""
    what = f"acceptance must be an acceptance rule such as mmspec.Exact() (see mmspec.AcceptanceRule); " \
           f"{type(rule).__name__}"
    missing = [m for m in RULE_METHODS if not callable(getattr(rule, m, None))]
    if missing:
        raise InputTypeError(f"{what} has no method {', '.join(missing)}")
    relaxed, k = getattr(rule, "relaxed", None), getattr(rule, "k", None)
    if not isinstance(relaxed, bool):
        raise InputTypeError(f"{what} needs a bool attribute `relaxed`, got {relaxed!r}")
    if isinstance(k, bool) or not isinstance(k, int) or k < (1 if relaxed else 0):
        raise InputTypeError(f"{what} needs an integer attribute `k` (>= 1 for a relaxed rule), got {k!r}")
    return rule


# A relaxed rule's k is a column count of the [V, k] neighbour table kept for the target's life: k = 16383 on a 16k
# codebook would hold 2.1 GB. LANTERN's own settings stay at or below 1000 (Jang et al., ICLR 2025).
MAX_K = 1024


def _check_k(k: object, name: str) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise InputError(f"{name}(k=...) must be an integer >= 1 (neighbours per drafted code), got {k!r}")
    if k > MAX_K:
        raise InputError(f"{name}(k={k}) is more than {MAX_K} neighbours per code (the table would be codebook x k "
                         f"codes, kept in memory); use k <= {MAX_K}")


def _claimed(target_probs: Tensor, tokens: Tensor, neighbours: Tensor, k: int, budget: Tensor) -> Tensor:
    """[N, V] probs, [N] tokens, [V, >=k] table, [N] budget -> [N, k] bool: which of each token's k nearest neighbours
    it claims, the longest nearest-first prefix whose cumulative mass stays within the budget."""
    if neighbours is None:
        raise InputError("a relaxed acceptance rule needs the target's neighbour table (ImagePipeline.neighbours)")
    if k > neighbours.shape[1]:
        raise InputError(f"k={k} is more than the {neighbours.shape[1]} neighbours in the table; use a smaller k")
    near = neighbours[tokens.to(neighbours.device)][:, :k].to(target_probs.device)  # [N, k]
    cum = target_probs.gather(1, near).cumsum(1)
    # cum is non-decreasing, so "within budget" is a prefix: m* = its length, exactly the paper's largest m.
    return cum <= budget[:, None]


@dataclass(frozen=True)
class _Relaxed:
    """LANTERN's latent-space relaxation, shared by both rules; a subclass says only how large the claim may be."""

    relaxed = True
    k: int = 8

    def budget(self, p_x: Tensor) -> Tensor:  # [N] p(x) -> [N] the most neighbour mass x may claim
        raise NotImplementedError

    def relaxed_set(self, target_probs: Tensor, token: Tensor, neighbours: Tensor | None = None) -> Tensor:
        """target_probs [V], token [1] -> [1 + m*] long: x, then the m* nearest neighbours it claims."""
        probs = target_probs[None]
        x = token.reshape(1).to(target_probs.device)
        take = _claimed(probs, x, neighbours, self.k, self.budget(probs[:, x[0]]))[0]
        near = neighbours[x.to(neighbours.device)][0, : self.k].to(target_probs.device)
        return torch.cat([x, near[take]])

    def relaxed_mass(self, target_probs: Tensor, tokens: Tensor, neighbours: Tensor | None = None) -> Tensor:
        """target_probs [N, V], tokens [N] -> [N]: p~(x) = p(x) + S_m*, the mass of A(x)."""
        tokens = tokens.reshape(-1).to(target_probs.device)
        p_x = target_probs.gather(1, tokens[:, None])[:, 0]
        take = _claimed(target_probs, tokens, neighbours, self.k, self.budget(p_x))
        near = neighbours[tokens.to(neighbours.device)][:, : self.k].to(target_probs.device)
        return p_x + (target_probs.gather(1, near) * take).sum(1)


@dataclass(frozen=True)
class Lantern(_Relaxed):
    """LANTERN (Jang et al., ICLR 2025): x also claims its nearest latent neighbours while their target mass stays
    within delta, so TV(p, p~) <= delta. delta = 0 claims nothing: `Exact`, token for token under one seed."""

    k: int = 8
    delta: float = 0.2

    def __post_init__(self) -> None:
        _check_k(self.k, "Lantern")
        if isinstance(self.delta, bool) or not isinstance(self.delta, (int, float)) or not 0.0 <= self.delta <= 1.0:
            raise InputError(f"Lantern(delta=...) must be a number in [0, 1] (a total-variation bound), got {self.delta!r}")

    def budget(self, p_x: Tensor) -> Tensor:
        return torch.full_like(p_x, float(self.delta))


@dataclass(frozen=True)
class LanternPP(_Relaxed):
    """LANTERN++ (Park et al., 2025): the claimed neighbour mass is capped relative to x, p~(x) <= lam * p(x), so a
    code the target finds unlikely cannot borrow much whatever its neighbours hold. lam = 1 is `Exact`."""

    k: int = 8
    lam: float = 2.0

    def __post_init__(self) -> None:
        _check_k(self.k, "LanternPP")
        if isinstance(self.lam, bool) or not isinstance(self.lam, (int, float)) or not self.lam >= 1.0:
            raise InputError(f"LanternPP(lam=...) must be a number >= 1 (p~(x) <= lam * p(x)), got {self.lam!r}")

    def budget(self, p_x: Tensor) -> Tensor:
        return (float(self.lam) - 1.0) * p_x
