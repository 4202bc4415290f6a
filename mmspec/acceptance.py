"""Acceptance rules: small frozen objects that say how far the distribution a drafted code is tested against may move.

The sibling recursion in `verify.accept_sampling` is the one place that decides. At a node whose (residual) target
distribution is r (unnormalised, mass m) and a child drafted from q (a point mass at x for an EAGLE tree, the
previous verify's distribution for a Jacobi window), a rule answers one question:

- `relax(residual [V], draft [V], neighbours, budget) -> (relaxed [V], moved)`: the distribution the child is tested
  against, `draft` being q scaled to the residual's mass m. The child is accepted with min(1, relaxed(x) / draft(x));
  a rejection leaves max(0, relaxed - draft). `moved` is the mass the rule moved, TV(r, relaxed) in the residual's
  units; the siblings of one node share `node_budget` of it (each sibling moves out of what the earlier ones left).

Because the relaxed target is chosen from (r, q) before x is looked at, each test is exact speculative sampling
against it: the committed code at a node follows p with every move applied, so TV(p, committed) <= the moves' total.
`Exact` moves nothing: standard, lossless speculative sampling (point drafts: x is accepted with probability r(x)/m).
Relaxed rules move mass between latent-space neighbours (`neighbours` [V, k'], each code's nearest other codes,
nearest first: ImagePipeline.neighbours) and only make sense for image-code targets.

`relaxed_mass(target_probs [N, V], tokens [N], neighbours) -> [N]` is the same rule for a point draft at a fresh
node (the mass that stands in for p(x)); greedy decoding reads it (verify.accept_relaxed_greedy).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from .errors import InputError, InputTypeError


def point_draft(residual: Tensor, token: int | Tensor) -> Tensor:
    """[V] residual, token -> [V] the point draft at `token` with the residual's mass (an EAGLE-tree child)."""
    return torch.zeros_like(residual).index_fill_(0, torch.as_tensor(token, device=residual.device).reshape(1),
                                                  float(residual.sum()))


@dataclass(frozen=True)
class Exact:
    """Lossless: a drafted token is tested against the target's own probability of it."""

    relaxed = False  # True for rules that change the output distribution (refused on text targets)
    node_budget = 0.0  # mass the siblings of one node may move together
    k = 0  # reads no neighbours

    def relax(self, residual: Tensor, draft: Tensor, neighbours: Tensor | None, budget: float) -> tuple[Tensor, float]:
        return residual, 0.0

    def relaxed_mass(self, target_probs: Tensor, tokens: Tensor, neighbours: Tensor | None = None) -> Tensor:
        """target_probs [N, V], tokens [N] -> [N]: p(x)."""
        return target_probs.gather(1, tokens.reshape(-1, 1).to(target_probs.device))[:, 0]


EXACT = Exact()


class AcceptanceRule(Protocol):
    """Everything the engine reads of an acceptance rule (`acceptance=` takes any object that has it): `Exact`,
    `Lantern`, `LanternPP`, `Grouped` or a rule of your own. `relaxed`: it changes the output distribution (refused on
    text targets); `k`: the neighbours per code it reads from the table (0 reads none);
    `node_budget`: the mass the siblings of one node may move together; `relax` and `relaxed_mass` as above."""

    relaxed: bool
    k: int
    node_budget: float

    def relax(self, residual: Tensor, draft: Tensor, neighbours: Tensor | None, budget: float
              ) -> tuple[Tensor, float]: ...

    def relaxed_mass(self, target_probs: Tensor, tokens: Tensor, neighbours: Tensor | None = None) -> Tensor: ...


RULE_METHODS = ("relax", "relaxed_mass")


def check_rule(rule: object) -> AcceptanceRule:
    """The rule, when it has all of AcceptanceRule, else a one-line error naming what it lacks."""
    what = f"acceptance must be an acceptance rule such as mmspec.Exact() (see mmspec.AcceptanceRule); " \
           f"{type(rule).__name__}"
    missing = [m for m in RULE_METHODS if not callable(getattr(rule, m, None))]
    if missing:
        raise InputTypeError(f"{what} has no method {', '.join(missing)}")
    relaxed, k, budget = (getattr(rule, a, None) for a in ("relaxed", "k", "node_budget"))
    if not isinstance(relaxed, bool):
        raise InputTypeError(f"{what} needs a bool attribute `relaxed`, got {relaxed!r}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise InputTypeError(f"{what} needs an integer attribute `k` >= 0 (neighbours it reads), got {k!r}")
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not budget >= 0:
        raise InputTypeError(f"{what} needs a number attribute `node_budget` >= 0, got {budget!r}")
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


def _check_fraction(value: object, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise InputError(f"{what} must be a number in [0, 1], got {value!r}")


def _near(neighbours: Tensor | None, codes: Tensor, k: int, device) -> Tensor:
    """[N] codes -> [N, k] their k nearest other codes, nearest first."""
    if neighbours is None:
        raise InputError("a relaxed acceptance rule needs the target's neighbour table (ImagePipeline.neighbours)")
    if k > neighbours.shape[1]:
        raise InputError(f"k={k} is more than the {neighbours.shape[1]} neighbours in the table; use a smaller k")
    return neighbours[codes.to(neighbours.device)][:, :k].to(device)


def _prefix_claims(give: Tensor, cap: Tensor) -> Tensor:
    """[R, k] mass each receiver may take from its neighbours (nearest first), [R] cap -> [R, k] what it claims: the
    longest nearest-first prefix whose cumulative mass stays within the cap (cum is non-decreasing, so "within the
    cap" is a prefix: LANTERN's m*, the largest m with S_m <= delta)."""
    return give * (give.cumsum(1) <= cap[:, None])


@dataclass(frozen=True)
class _Relaxed:
    """LANTERN's latent-space relaxation, shared by both rules; a subclass says only how much a code may claim."""

    relaxed = True
    k: int = 8

    def claim_cap(self, p_x: Tensor) -> Tensor:  # [N] p(x) -> [N] the most neighbour mass x may claim
        raise NotImplementedError

    @property
    def node_budget(self) -> float:
        raise NotImplementedError

    def relax(self, residual: Tensor, draft: Tensor, neighbours: Tensor | None, budget: float) -> tuple[Tensor, float]:
        """Codes the draft wants more of than the residual holds (receivers; x alone for a point draft) claim their
        nearest neighbours' excess, nearest first, within the rule's cap and the node's budget left. A neighbour
        claimed by several receivers gives each an equal share, and a total over the budget is scaled down to it."""
        if budget <= 0:
            return residual, 0.0
        receivers = (draft > residual).nonzero()[:, 0]  # [R]
        if receivers.numel() == 0:
            return residual, 0.0
        near = _near(neighbours, receivers, self.k, residual.device)  # [R, k]
        give = (residual - draft).clamp(min=0)[near]
        cap = self.claim_cap(residual[receivers]).clamp(max=budget)
        claims = _prefix_claims(give, cap)
        shared = torch.zeros_like(residual).index_add_(0, near.flatten(), (claims > 0).flatten().to(residual.dtype))
        claims = claims / shared[near].clamp(min=1)
        moved = float(claims.sum())
        if moved > budget:
            claims, moved = claims * (budget / moved), budget
        relaxed = residual.index_add(0, receivers, claims.sum(1)).index_add_(0, near.flatten(), -claims.flatten())
        return relaxed.clamp_(min=0), moved

    def relaxed_mass(self, target_probs: Tensor, tokens: Tensor, neighbours: Tensor | None = None) -> Tensor:
        """target_probs [N, V], tokens [N] -> [N]: p~(x) = p(x) + S_m*, the mass of x and the neighbours it claims."""
        tokens = tokens.reshape(-1).to(target_probs.device)
        p_x = target_probs.gather(1, tokens[:, None])[:, 0]
        near = _near(neighbours, tokens, self.k, target_probs.device)
        cap = self.claim_cap(p_x).clamp(max=self.node_budget)
        return p_x + _prefix_claims(target_probs.gather(1, near), cap).sum(1)


@dataclass(frozen=True)
class Lantern(_Relaxed):
    """LANTERN (Jang et al., ICLR 2025): a drafted code also claims its nearest latent neighbours while their target
    mass stays within delta. The siblings of a node share one delta, so TV(p, committed) <= delta at every node of any
    tree, and for Jacobi drafts too. delta = 0 claims nothing: `Exact`, token for token under one seed."""

    k: int = 8
    delta: float = 0.2

    def __post_init__(self) -> None:
        _check_k(self.k, "Lantern")
        _check_fraction(self.delta, "Lantern(delta=...) (a total-variation bound)")

    def claim_cap(self, p_x: Tensor) -> Tensor:
        return torch.full_like(p_x, float(self.delta))

    @property
    def node_budget(self) -> float:
        return float(self.delta)


@dataclass(frozen=True)
class LanternPP(_Relaxed):
    """LANTERN++ (Park et al., 2025): the neighbour mass a code claims is capped relative to the code, p~(x) <= lam *
    p(x), so a code the target finds unlikely cannot borrow much whatever its neighbours hold. Claims come out of what
    earlier siblings left, so at every node of a tree of point drafts (or a chain of Jacobi drafts) no code is
    committed more than lam times as often as the target would, and TV(p, committed) <= (lam - 1) * p(drafted codes).
    lam = 1 is `Exact`."""

    k: int = 8
    lam: float = 2.0

    def __post_init__(self) -> None:
        _check_k(self.k, "LanternPP")
        if isinstance(self.lam, bool) or not isinstance(self.lam, (int, float)) or not self.lam >= 1.0:
            raise InputError(f"LanternPP(lam=...) must be a number >= 1 (p~(x) <= lam * p(x)), got {self.lam!r}")

    def claim_cap(self, p_x: Tensor) -> Tensor:
        return (float(self.lam) - 1.0) * p_x

    @property
    def node_budget(self) -> float:
        return math.inf if self.lam > 1 else 0.0


@dataclass(frozen=True)
class Grouped:
    """Grouped acceptance in the style of GSD (So et al., ICCV 2025): a drafted code is tested with the mass of its
    group, a dynamic cluster of codes near each other in the VQ latent space and in target probability.

    Groups are built from the residual r and the draft q before the drafted code is looked at: each code follows the
    code the draft favours most among itself and its k latent neighbours whose probability is within `closeness` of
    its own (a code followed only when it leads itself), and inside a group the target's mass is spread as the draft
    spreads it. A drafted x is then accepted with min(1, r(G) / q(G)), GSD's test, and the committed code is exact at
    the level of groups. Groups are kept cheapest first while the mass they move (p(G) * TV(p(.|G), q(.|G)) each)
    stays within delta, shared by the siblings of a node: TV(p, committed) <= delta at every node, for point drafts
    (a drafter's tree) and Jacobi drafts alike. delta = 0 is `Exact`."""

    relaxed = True
    k: int = 8
    delta: float = 0.3
    closeness: float = 0.15

    def __post_init__(self) -> None:
        _check_k(self.k, "Grouped")
        _check_fraction(self.delta, "Grouped(delta=...) (a total-variation bound)")
        _check_fraction(self.closeness, "Grouped(closeness=...) (a probability difference)")

    @property
    def node_budget(self) -> float:
        return float(self.delta)

    def relax(self, residual: Tensor, draft: Tensor, neighbours: Tensor | None, budget: float) -> tuple[Tensor, float]:
        if budget <= 0:
            return residual, 0.0
        v, dev = residual.numel(), residual.device
        codes = torch.arange(v, device=dev)
        cand = torch.cat([codes[:, None], _near(neighbours, codes, self.k, dev)], 1)  # [V, 1 + k], itself first
        close = (residual[cand] - residual[:, None]).abs() <= self.closeness * float(residual.sum())
        # argmax takes the first of equal scores, so a code the draft gives no more than its neighbours leads itself
        leader = cand.gather(1, torch.where(close, draft[cand], -1.0).argmax(1, keepdim=True))[:, 0]
        group = torch.where(leader[leader] == leader, leader, codes)  # [V] each code's group, named by its leader

        def total(x: Tensor) -> Tensor:  # [V] per code -> [V] per group
            return torch.zeros_like(residual).index_add_(0, group, x)

        p_g, q_g = total(residual), total(draft)
        spread = torch.where(q_g[group] > 0, draft * p_g[group] / q_g[group].clamp(min=1e-30), residual)
        cost = total((spread - residual).abs()) / 2  # [V] mass each group moves (0 for singletons)
        order = cost.argsort()
        fits = cost[order].cumsum(0) <= budget
        keep = torch.zeros(v, dtype=torch.bool, device=dev)
        keep[order] = fits
        relaxed, moved = torch.where(keep[group], spread, residual), float(cost[keep].sum())
        if not bool(fits.all()):  # the cheapest group that does not fit whole keeps what the budget left allows
            first = int(order[int((~fits).nonzero()[0])])
            relaxed, moved = _trimmed(relaxed, residual, draft, (group == first).nonzero()[:, 0], first, budget - moved,
                                      moved)
        return relaxed, moved

    def relaxed_mass(self, target_probs: Tensor, tokens: Tensor, neighbours: Tensor | None = None) -> Tensor:
        """target_probs [N, V], tokens [N] -> [N]: the mass x is tested with as a point draft at a fresh node."""
        tokens = tokens.reshape(-1).tolist()
        return torch.stack([self.relax(p, point_draft(p, x), neighbours, self.node_budget)[0][x]
                            for p, x in zip(target_probs, tokens)])


def _trimmed(relaxed: Tensor, residual: Tensor, draft: Tensor, members: Tensor, leader: int, budget: float,
             moved: float) -> tuple[Tensor, float]:
    """Keep the leader and the largest prefix of a group's other members (least target mass first) whose spread moves
    at most `budget`; [m] members. The cost of every prefix at once: prefix j holds the leader and followers[:j]."""
    followers = members[members != leader]
    followers = followers[residual[followers].argsort()]
    idx = torch.cat([torch.tensor([leader], device=members.device), followers])  # [m], leader first
    r, q = residual[idx], draft[idx]
    inside = torch.ones(idx.numel(), idx.numel(), dtype=torch.bool, device=idx.device).tril()  # [prefix, member]
    p_j, q_j = (inside * r).sum(1), (inside * q).sum(1)
    spread = torch.where(q_j[:, None] > 0, q * (p_j / q_j.clamp(min=1e-30))[:, None], r)  # [prefix, member]
    cost = ((spread - r).abs() * inside).sum(1) / 2
    fits = cost <= budget
    fits[0] = True  # the leader alone moves nothing (its cost may round to a hair above 0, or the budget below it)
    best = int(fits.nonzero()[-1])
    out = relaxed.clone()
    out[idx[: best + 1]] = spread[best, : best + 1]
    return out, moved + float(cost[best])
