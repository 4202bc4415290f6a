"""Acceptance rules: pure functions from (tree, target logits) to the tokens committed this step.

Terms used throughout:
- target_logits: [T, V] the target's logits at every tree node; row i is the target's prediction for the token that
  follows node i on its root-to-node path.
- target_probs: the same rows warped (temperature, top_k, top_p) and normalised, as transformers' generate samples from.
- draft_probs: [T, V] the distribution q each drafted node was sampled from (DraftTree.draft_probs). EAGLE-2 expands
  the top_k children deterministically, so its drafts are point masses (draft_probs None, q = one-hot); a Jacobi
  window's drafts are samples of the previous verify's distributions. One rejection rule serves both.
- accepted tokens: the drafted tokens on the accepted root-to-node path (the root itself is already committed).
- bonus token: one more token drawn from the target at the last accepted node, so every step commits at least one.

No model, cache or global state in here; every random draw comes from the injected torch.Generator.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
from torch import Tensor

from .acceptance import EXACT, point_draft
from .config import SamplingConfig
from .errors import InputError
from .tree import DraftTree


@dataclass(frozen=True)
class Acceptance:
    path: Tensor  # [n + 1] long, CPU: tree node indices, root first, then the accepted drafted nodes
    tokens: tuple[int, ...]  # committed this step: the accepted drafted tokens, then the bonus token

    @property
    def num_accepted(self) -> int:
        """Drafted tokens accepted (the bonus token not counted)."""
        return self.path.numel() - 1

    @property
    def bonus(self) -> int:
        return self.tokens[-1]


def warp(logits: Tensor, sampling: SamplingConfig) -> Tensor:
    """[..., V] logits -> [..., V] target_probs, in transformers' order: temperature, then top_k, then top_p."""
    scores = logits.float() / sampling.temperature
    if sampling.top_k > 0 and sampling.top_k < scores.shape[-1]:
        kth = torch.topk(scores, sampling.top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if sampling.top_p < 1.0:
        sorted_scores, sorted_idx = torch.sort(scores, dim=-1, descending=False)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        remove_sorted = cumulative <= (1 - sampling.top_p)
        remove_sorted[..., -1] = False  # always keep the most likely token
        remove = remove_sorted.scatter(-1, sorted_idx, remove_sorted)
        scores = scores.masked_fill(remove, float("-inf"))
    return scores.softmax(dim=-1)


def inverse_cdf(weights: Tensor, u: float | Tensor) -> int:
    """A draw from the unnormalised [V] `weights` by one uniform u in [0, 1) (a float, or a 0-dim tensor on the
    weights' device): the first token whose cumulative weight exceeds u * total. Tokens of weight 0 are never drawn:
    their cumulative weight equals the previous one, and when rounding puts u * total at the very top the draw is the
    last token of positive weight. One host read."""
    cdf = weights.double().cumsum(0)  # float64: the total of a long vocabulary is exact enough to the last token
    last = torch.where(weights > 0, torch.arange(weights.numel(), device=weights.device), -1).max()
    last = torch.where(last >= 0, last, weights.numel() - 1)  # nothing positive: any index, as before
    draw = torch.searchsorted(cdf, cdf[-1:] * u, right=True)[0]
    return int(torch.minimum(draw, last))


def accept_greedy(tree: DraftTree, target_logits: Tensor) -> Acceptance:
    """Longest root-to-node path whose every drafted token equals the target's argmax at its parent, plus the bonus."""
    pred = target_logits.argmax(dim=-1)
    both = torch.stack([tree.tokens, pred]).cpu()  # the one host sync of the step
    tokens, pred = both[0], both[1]
    correct = torch.ones_like(tokens, dtype=torch.bool)
    correct[1:] = tokens[1:] == pred[tree.parents[1:]]
    return _longest(tree, tokens, correct, pred)


def accept_relaxed_greedy(tree: DraftTree, target_logits: Tensor, rule, neighbours: Tensor) -> Acceptance:
    """Greedy decoding under a relaxed rule: a drafted x is correct when it is the argmax at its parent or its relaxed
    mass on the parent's softmax is strictly above the top probability there, p~(x) > max p; the bonus is the
    target's argmax. With nothing claimed (delta = 0) that is accept_greedy, ties included."""
    probs = target_logits.float().softmax(dim=-1)  # [T, V]
    parents = tree.parents[1:].to(probs.device)
    rows = probs[parents]  # [T - 1, V] each drafted node's parent row
    top, best = rows.max(dim=-1)
    drafted = tree.tokens[1:].to(probs.device)
    wins = (drafted == best) | (rule.relaxed_mass(rows, drafted, neighbours) > top)
    correct = torch.cat([wins.new_ones(1), wins]).cpu()
    return _longest(tree, tree.tokens.cpu(), correct, probs.argmax(dim=-1).cpu())


def _longest(tree: DraftTree, tokens: Tensor, correct: Tensor, pred: Tensor) -> Acceptance:
    """tokens, correct (per node, root True), pred (argmax per node) on CPU -> the longest all-correct path + bonus."""
    paths = tree.paths
    ok = torch.where(paths >= 0, correct[paths.clamp(min=0)], torch.zeros((), dtype=torch.bool))
    lengths = ok.long().cumprod(dim=1).sum(dim=1)  # nodes on the path accepted so far, root included
    best = int(lengths.argmax())
    path = paths[best, : int(lengths[best])]
    last = int(path[-1])
    return Acceptance(path=path, tokens=tuple(tokens[path[1:]].tolist()) + (int(pred[last]),))


@dataclass(frozen=True)
class SiblingTest:
    """One drafted child tested against its parent's residual (see accept_sampling)."""

    accept: float  # probability that the child is accepted, given that it is tested
    reached: float  # the residual's mass when the child is tested: P(tested | parent reached)
    residual: Tensor  # [V] unnormalised: what is left of the parent's distribution after a rejection
    moved: float  # mass the rule moved for this test (out of the node's budget)


def sibling_test(residual: Tensor, token: int, draft_row: Tensor | None, rule, neighbours: Tensor | None,
                 budget: float) -> SiblingTest:
    """residual [V] (unnormalised), the child's token, its draft distribution q [V] (None: a point draft) -> the test.

    The child is tested against the rule's relaxed residual r~ with its draft scaled to the residual's mass, Q = m q:
    accepted with min(1, r~(x) / Q(x)); a rejection leaves max(0, r~ - Q) (SpecInfer's multi-draft residual, which
    for a point draft is r~ with x removed)."""
    left = float(residual.sum())
    if draft_row is None and not rule.relaxed:  # the common EAGLE case, in three ops: x alone, accepted with r(x)/m
        p_x = float(residual[token])
        return SiblingTest(1.0 if p_x >= left else p_x / left, left, residual.index_fill(0, torch.tensor([token],
                           device=residual.device), 0.0), 0.0)
    draft = point_draft(residual, token) if draft_row is None else draft_row.to(residual.dtype) * left
    relaxed, moved = rule.relax(residual, draft, neighbours, budget)
    p_x, q_x = float(relaxed[token]), float(draft[token])
    accept = 1.0 if p_x >= q_x else p_x / q_x
    return SiblingTest(accept, left, (relaxed - draft).clamp_(min=0), moved)


def accept_sampling(
    tree: DraftTree,
    target_logits: Tensor,
    sampling: SamplingConfig,
    generator: torch.Generator | None,
    rule=EXACT,
    neighbours: Tensor | None = None,
) -> Acceptance:
    """Recursive rejection sampling over siblings (SpecInfer / EAGLE), exact for point drafts and sampled drafts.

    At a node with target_probs p and children c1, c2, ...: c1 is tested against p (sibling_test); on rejection c2 is
    tested against what c1 left, and so on. An accepted child becomes the new node; when every child is rejected, or
    the node is a leaf, the bonus token is drawn from what is left. Under `Exact` each committed token is therefore
    distributed exactly as the target's warped distribution (siblings carry distinct tokens, which DraftTree
    guarantees, or independent samples); a relaxed rule moves it by at most the node's budget, which the siblings
    share. `neighbours` [V, k] is what a relaxed rule reads; `Exact` ignores it.
    """
    if sampling.greedy:
        raise InputError("accept_sampling needs temperature > 0; use accept_greedy for temperature 0")
    target_probs = warp(target_logits, sampling)  # [T, V]
    t = tree.size
    # Every decision of the step reads from these draws: uniform u[c] decides child c, u[0] draws the bonus token.
    uniforms = torch.rand(t, generator=generator, device=target_probs.device)
    if all(len(c) <= 1 for c in tree.children) and hasattr(rule, "relax_rows"):
        return _chain_walk(tree, target_probs, uniforms, rule, neighbours)
    if not rule.relaxed and tree.draft_probs is None:
        return _exact_walk(tree, target_probs, uniforms)
    uniforms = uniforms.tolist()
    tokens = tree.tokens.tolist()
    node, path = 0, [0]
    residual = target_probs[0]
    while tree.children[node]:
        budget = rule.node_budget
        for c in tree.children[node]:
            q = None if tree.draft_probs is None else tree.draft_probs[c]
            test = sibling_test(residual, tokens[c], q, rule, neighbours, budget)
            if uniforms[c] < test.accept:
                node = c
                break
            residual, budget = test.residual, budget - test.moved
        else:
            break
        path.append(node)
        residual = target_probs[node]
    bonus = inverse_cdf(residual, uniforms[0])
    return Acceptance(path=torch.tensor(path, dtype=torch.long), tokens=tuple(tokens[i] for i in path[1:]) + (bonus,))


def _exact_walk(tree: DraftTree, target_probs: Tensor, uniforms: Tensor) -> Acceptance:
    """accept_sampling under `Exact` for a tree of point drafts: the residual of a node's j-th child is p with the
    earlier siblings' tokens removed, known before the walk, so every child's test is computed at once on the device
    and the host reads the step twice (the tests' outcomes, the bonus draw) however wide the tree. The decisions are
    the sibling walk's for the same draws (up to float rounding)."""
    parents, drafted = tree.parents[1:].to(target_probs.device), tree.tokens[1:]
    p_x, total = target_probs[parents, drafted].double(), target_probs.double().sum(dim=-1)
    earlier = torch.tril(parents[:, None] == parents[None, :], diagonal=-1)  # [T-1, T-1] earlier siblings
    left = total[parents] - (earlier * p_x).sum(dim=1)  # the residual's mass when the child is tested
    # p(x) > 0: rounding can leave a hair of mass after siblings that held it all; a zero-probability code never passes
    passed = (uniforms[1:] < torch.where(p_x >= left, 1.0, p_x / left)) & (p_x > 0)
    kids_of = tree.children
    path = _first_passing_path(kids_of, drafted, passed)
    tokens, node = path.tokens, path.nodes[-1]
    residual = target_probs[node]
    if kids_of[node]:
        residual = residual.index_fill(0, drafted[[k - 1 for k in kids_of[node]]], 0.0)
    return _finish(path.nodes, tokens, residual, uniforms, target_probs[node])


def _chain_walk(tree: DraftTree, target_probs: Tensor, uniforms: Tensor, rule, neighbours: Tensor | None
                ) -> Acceptance:
    """accept_sampling on a chain (a Jacobi window, an EAGLE chain): every drafted node is its parent's only child,
    so each test meets a fresh node with the rule's whole budget and none depends on another's outcome. All are
    relaxed at once (rule.relax_rows) and tested on the device; the host reads the step twice. The decisions are the
    sibling walk's for the same draws (up to float rounding)."""
    drafted = tree.tokens[1:]
    if drafted.numel() == 0:  # the root alone: plain decoding
        return _finish([0], [], target_probs[0], uniforms, target_probs[0])
    rows = target_probs[:-1]  # [N, V] node n tests node n + 1
    mass = rows.sum(dim=1, keepdim=True)
    if tree.draft_probs is None:  # point drafts: all of the node's mass on x
        draft = torch.zeros_like(rows).scatter_(1, drafted[:, None], mass)
    else:
        draft = tree.draft_probs[1:].to(rows.dtype) * mass
    relaxed, _ = rule.relax_rows(rows, draft, neighbours, rule.node_budget)
    r_x, q_x = relaxed.gather(1, drafted[:, None])[:, 0], draft.gather(1, drafted[:, None])[:, 0]
    passed = (uniforms[1:] < torch.where(r_x >= q_x, 1.0, r_x / q_x)) & (r_x > 0)
    path = _first_passing_path(tree.children, drafted, passed)
    node = path.nodes[-1]
    residual = (relaxed[node] - draft[node]).clamp_(min=0) if node < drafted.numel() else target_probs[node]
    return _finish(path.nodes, path.tokens, residual, uniforms, target_probs[node])


@dataclass(frozen=True)
class _Path:
    nodes: list[int]  # root first
    tokens: list[int]  # the drafted tokens of nodes[1:]


def _first_passing_path(children: list[list[int]], drafted: Tensor, passed: Tensor) -> _Path:
    """From the root, the first child that passed its test, until none did: the one host read of the tests."""
    host = torch.stack([drafted, passed.long()]).tolist()
    ok, path = [True] + [bool(x) for x in host[1]], [0]
    while (node := next((c for c in children[path[-1]] if ok[c]), None)) is not None:
        path.append(node)
    return _Path(path, [host[0][n - 1] for n in path[1:]])


def _finish(nodes: list[int], tokens: list[int], residual: Tensor, uniforms: Tensor, row: Tensor) -> Acceptance:
    """The accepted path and the bonus drawn from what is left at its end (the second host read). A rejection that
    only rounding allowed (the children held all of the mass) leaves nothing: then the bonus is drawn from the node's
    own distribution `row` rather than from an empty residual (on the device: no extra read)."""
    residual = torch.where(residual.sum() > 0, residual, row)
    bonus = inverse_cdf(residual, uniforms[0])
    return Acceptance(path=torch.tensor(nodes, dtype=torch.long), tokens=tuple(tokens) + (bonus,))


Acceptor = Callable[[DraftTree, Tensor], Acceptance]


def acceptor(rule, sampling: SamplingConfig, generator: torch.Generator | None, neighbours: Tensor | None = None
             ) -> Acceptor:
    """The generation loop's acceptance step, (tree, [T, V] processed target logits) -> Acceptance, for one rule and
    warp. Greedy exact acceptance needs no draws and takes the vectorised longest-match path."""
    if sampling.greedy and not rule.relaxed:
        return accept_greedy
    if sampling.greedy:
        return partial(accept_relaxed_greedy, rule=rule, neighbours=neighbours)
    return partial(accept_sampling, sampling=sampling, generator=generator, rule=rule, neighbours=neighbours)
