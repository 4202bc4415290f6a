"""Acceptance rules: small frozen objects that say how much target mass stands in for a drafted token when it is tested.

The sibling recursion in `verify.accept_sampling` is the one place that decides; a rule only answers, for a drafted
token x at a node whose (residual) target distribution is p, which tokens A(x) it may claim:

- `relaxed_set(target_probs, token, neighbours)` -> [m] long, A(x) for one row [V] and one drafted token [1], x first;
- `relaxed_mass(target_probs, tokens, neighbours)` -> [N], the mass p(A(x)) that stands in for p(x) in the test.

After a rejection the residual removes exactly A(x). `Exact` claims A(x) = {x}: standard, lossless speculative sampling.
Relaxed rules (LANTERN) claim a few latent-space neighbours of x as well and only make sense for image-code targets.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass(frozen=True)
class Exact:
    """Lossless: a drafted token is tested against the target's own probability of it."""

    relaxed = False  # True for rules that change the output distribution (refused on text targets)

    def relaxed_set(self, target_probs: Tensor, token: Tensor, neighbours: Tensor | None = None) -> Tensor:
        """target_probs [V], token [1] long -> [1]: the token alone."""
        return token

    def relaxed_mass(self, target_probs: Tensor, tokens: Tensor, neighbours: Tensor | None = None) -> Tensor:
        """target_probs [N, V], tokens [N] -> [N]: p(x)."""
        return target_probs.gather(1, tokens.reshape(-1, 1).to(target_probs.device))[:, 0]


EXACT = Exact()


def check_rule(rule: object) -> Exact:
    if not callable(getattr(rule, "relaxed_set", None)) or not callable(getattr(rule, "relaxed_mass", None)):
        from .errors import InputTypeError

        raise InputTypeError(f"acceptance must be an acceptance rule such as mmspec.Exact(), got {type(rule).__name__}")
    return rule
