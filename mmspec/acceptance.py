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

`relax_rows(residual [N, V], draft [N, V], neighbours, budget) -> (relaxed [N, V], moved [N])` is `relax` for N
rows at once, each with the whole budget: the tests of a chain (a Jacobi window), where every drafted node is its
parent's only child and so meets a fresh node, are all relaxed in one pass (a rule without it is walked node by node).
The built-in rules' `relax` is `relax_rows` on one row: one place for each rule.

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

    def relax_rows(self, residual: Tensor, draft: Tensor, neighbours: Tensor | None, budget: float
                   ) -> tuple[Tensor, Tensor]:
        return residual, residual.new_zeros(residual.shape[0])

    def relaxed_mass(self, target_probs: Tensor, tokens: Tensor, neighbours: Tensor | None = None) -> Tensor:
        """target_probs [N, V], tokens [N] -> [N]: p(x)."""
        return target_probs.gather(1, tokens.reshape(-1, 1).to(target_probs.device))[:, 0]


EXACT = Exact()


class AcceptanceRule(Protocol):
    """Everything the engine reads of an acceptance rule (`acceptance=` takes any object that has it): `Exact`,
    `Lantern`, `LanternPP`, `Grouped` or a rule of your own. `relaxed`: it changes the output distribution (refused on
    text targets); `k`: the neighbours per code it reads from the table (0 reads none);
    `node_budget`: the mass the siblings of one node may move together; `relax` and `relaxed_mass` as above. A rule
    may also have `relax_rows` (above): chains are then tested in one pass, else node by node."""

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


# Elements of the widest intermediate ([rows, V, 1 + k]) a batched relaxation holds at once: a Jacobi window of 16
# rows on a 16k codebook at k = 1024 would otherwise hold a gigabyte.
_CHUNK = 1 << 24

def _in_chunks(relax_rows, width: int, residual: Tensor, draft: Tensor, neighbours: Tensor | None, budget: float
               ) -> tuple[Tensor, Tensor] | None:
    """relax_rows over chunks of rows whose [rows, V, width] intermediates fit _CHUNK; None when all rows fit."""
    rows = max(1, _CHUNK // (residual.shape[1] * width))
    if residual.shape[0] <= rows:
        return None
    parts = [relax_rows(r, d, neighbours, budget) for r, d in zip(residual.split(rows), draft.split(rows))]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


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


def _near(neighbours: Tensor | None, codes: Tensor | None, k: int, device) -> Tensor:
    """[N] codes -> [N, k] their k nearest other codes, nearest first; codes None: every code's, [V, k]."""
    if neighbours is None:
        raise InputError("a relaxed acceptance rule needs the target's neighbour table (ImagePipeline.neighbours)")
    if k > neighbours.shape[1]:
        raise InputError(f"k={k} is more than the {neighbours.shape[1]} neighbours in the table; use a smaller k")
    rows = neighbours if codes is None else neighbours.index_select(0, codes.to(neighbours.device))
    return rows[:, :k].to(device)


def _prefix_claims(give: Tensor, cap: Tensor) -> Tensor:
    """[..., R, k] mass each receiver may take from its neighbours (nearest first), [..., R] cap -> [..., R, k] what
    it claims: the longest nearest-first prefix whose cumulative mass stays within the cap (cum is non-decreasing, so
    "within the cap" is a prefix: LANTERN's m*, the largest m with S_m <= delta)."""
    return give * (give.cumsum(-1) <= cap[..., None])


def _one_row(relax_rows, residual: Tensor, draft: Tensor, neighbours: Tensor | None, budget: float
             ) -> tuple[Tensor, float]:
    """A rule's `relax` as its `relax_rows` on one row."""
    relaxed, moved = relax_rows(residual[None], draft[None], neighbours, budget)
    return relaxed[0], float(moved[0])


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
        return _one_row(self.relax_rows, residual, draft, neighbours, budget)

    def relax_rows(self, residual: Tensor, draft: Tensor, neighbours: Tensor | None, budget: float
                   ) -> tuple[Tensor, Tensor]:
        """Codes the draft wants more of than the residual holds (receivers; x alone for a point draft) claim their
        nearest neighbours' excess, nearest first, within the rule's cap and the node's budget left. A neighbour
        claimed by several receivers gives each an equal share, and a total over the budget is scaled down to it.
        Only the codes some row receives at are looked at ([N, R, k]), so a point draft costs k, not V * k."""
        n, zeros = residual.shape[0], residual.new_zeros(residual.shape[0])
        if budget <= 0:
            return residual, zeros
        if (chunked := _in_chunks(self.relax_rows, self.k, residual, draft, neighbours, budget)) is not None:
            return chunked
        wants = draft > residual  # [N, V]
        cols = wants.any(0).nonzero()[:, 0]  # [R] codes some row receives at
        if cols.numel() == 0:
            return residual, zeros
        near = _near(neighbours, cols, self.k, residual.device)  # [R, k]
        flat = near.flatten()
        give = (residual - draft).clamp(min=0).index_select(1, flat).view(n, *near.shape)  # [N, R, k]
        cap = self.claim_cap(residual.index_select(1, cols)).clamp(max=budget) * wants.index_select(1, cols)
        claims = _prefix_claims(give, cap)
        shared = torch.zeros_like(residual).index_add_(1, flat, (claims > 0).flatten(1).to(residual.dtype))
        claims = claims / shared.index_select(1, flat).view_as(claims).clamp(min=1)
        moved = claims.sum((1, 2))  # [N]
        over = moved > budget
        claims = torch.where(over[:, None, None], claims * (budget / moved.clamp(min=1e-30))[:, None, None], claims)
        relaxed = residual.index_add(1, cols, claims.sum(2)).index_add_(1, flat, -claims.flatten(1))
        return relaxed.clamp_(min=0), torch.where(over, torch.full_like(moved, budget), moved)

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
        return _one_row(self.relax_rows, residual, draft, neighbours, budget)

    def relax_rows(self, residual: Tensor, draft: Tensor, neighbours: Tensor | None, budget: float
                   ) -> tuple[Tensor, Tensor]:
        n, v = residual.shape
        if budget <= 0:
            return residual, residual.new_zeros(n)
        if (chunked := _in_chunks(self.relax_rows, self.k + 1, residual, draft, neighbours, budget)) is not None:
            return chunked
        codes = torch.arange(v, device=residual.device)
        cand = torch.cat([codes[:, None], _near(neighbours, None, self.k, residual.device)], 1)  # [V, 1 + k]
        flat = cand.flatten()

        def at(x: Tensor) -> Tensor:  # [N, V] -> [N, V, 1 + k] the values of each code's candidates, itself first
            return x.index_select(1, flat).view(n, v, -1)

        close = (at(residual) - residual[:, :, None]).abs() <= self.closeness * residual.sum(1)[:, None, None]
        # argmax takes the first of equal scores, so a code the draft gives no more than its neighbours leads itself
        pick = torch.where(close, at(draft), -1.0).argmax(2, keepdim=True)
        leader = cand.expand(n, -1, -1).gather(2, pick)[..., 0]  # [N, V]
        group = torch.where(leader.gather(1, leader) == leader, leader, codes)  # each code's group, named by its leader

        def total(x: Tensor) -> Tensor:  # [N, V] per code -> [N, V] per group
            return torch.zeros_like(residual).scatter_add_(1, group, x)

        p_at, q_at = total(residual).gather(1, group), total(draft).gather(1, group)  # each code's group totals
        spread = torch.where(q_at > 0, draft * p_at / q_at.clamp(min=1e-30), residual)
        cost = total((spread - residual).abs()) / 2  # [N, V] mass each group moves (0 for singletons)
        relaxed, moved = spread, cost.sum(1)  # every group kept: the common case (~98 % of mini-gen's Jacobi tests)
        for row in (moved > budget).nonzero()[:, 0].tolist():
            relaxed[row], moved[row] = _within(residual[row], draft[row], spread[row], cost[row], group[row], budget)
        return relaxed, moved

    def relaxed_mass(self, target_probs: Tensor, tokens: Tensor, neighbours: Tensor | None = None) -> Tensor:
        """target_probs [N, V], tokens [N] -> [N]: the mass x is tested with as a point draft at a fresh node."""
        tokens = tokens.reshape(-1, 1).to(target_probs.device)
        drafts = torch.zeros_like(target_probs).scatter_(1, tokens, target_probs.sum(1, keepdim=True))
        return self.relax_rows(target_probs, drafts, neighbours, self.node_budget)[0].gather(1, tokens)[:, 0]


def _within(residual: Tensor, draft: Tensor, spread: Tensor, cost: Tensor, group: Tensor, budget: float
            ) -> tuple[Tensor, float]:
    """One row whose groups do not all fit the budget: groups kept cheapest first while they fit, and the first that
    does not fit keeps what the budget left allows (_trimmed); [V] each."""
    order = cost.argsort(stable=True)
    fits = cost[order].cumsum(0) <= budget  # a prefix of the order
    keep = torch.zeros_like(fits).scatter_(0, order, fits)
    relaxed, moved = torch.where(keep[group], spread, residual), float((cost * keep).sum())
    if bool(fits.all()):  # the total rounded above the budget, the running sum not
        return relaxed, moved
    first = int(order[int(fits.sum())])
    return _trimmed(relaxed, residual, draft, (group == first).nonzero()[:, 0], first, budget - moved, moved)


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
