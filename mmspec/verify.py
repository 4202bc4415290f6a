"""Acceptance rules: pure functions from (tree, target logits) to the tokens committed this step.

Terms used throughout:
- target_logits: [T, V] the target's logits at every tree node; row i is the target's prediction for the token that
  follows node i on its root-to-node path.
- target_probs: the same rows warped (temperature, top_k, top_p) and normalised, as transformers' generate samples from.
- draft_probs: the drafter's distribution over a node's children. EAGLE-2 expands the top_k children deterministically,
  so a drafted child is a point mass, not a sample; the rejection rule below is the exact one for point-mass proposals.
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

from .acceptance import EXACT
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


def inverse_cdf(weights: Tensor, u: float) -> int:
    """A draw from the unnormalised [V] `weights` by one uniform u in [0, 1): the first token whose cumulative weight
    exceeds u * total. Tokens of weight 0 are never drawn (their cumulative weight equals the previous one)."""
    cdf = weights.double().cumsum(0)  # float64: the total of a long vocabulary is exact enough to the last token
    return int(torch.searchsorted(cdf, cdf[-1:] * u, right=True).clamp(max=weights.numel() - 1))


def accept_greedy(tree: DraftTree, target_logits: Tensor) -> Acceptance:
    """Longest root-to-node path whose every drafted token equals the target's argmax at its parent, plus the bonus."""
    pred = target_logits.argmax(dim=-1)
    both = torch.stack([tree.tokens, pred]).cpu()  # the one host sync of the step
    tokens, pred = both[0], both[1]
    correct = torch.ones_like(tokens, dtype=torch.bool)
    correct[1:] = tokens[1:] == pred[tree.parents[1:]]
    return _longest(tree, tokens, correct, pred)


def accept_relaxed_greedy(tree: DraftTree, target_logits: Tensor, rule, neighbours: Tensor) -> Acceptance:
    """Greedy decoding under a relaxed rule: a drafted x is correct when its relaxed mass on its parent's softmax is at
    least the top probability there, p~(x) >= max p; the bonus is the target's argmax. delta = 0 gives accept_greedy."""
    probs = target_logits.float().softmax(dim=-1)  # [T, V]
    parents = tree.parents[1:].to(probs.device)
    rows = probs[parents]  # [T - 1, V] each drafted node's parent row
    wins = rule.relaxed_mass(rows, tree.tokens[1:], neighbours) >= rows.max(dim=-1).values
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


def accept_sampling(
    tree: DraftTree,
    target_logits: Tensor,
    sampling: SamplingConfig,
    generator: torch.Generator | None,
    rule=EXACT,
    neighbours: Tensor | None = None,
) -> Acceptance:
    """Recursive rejection sampling over siblings (SpecInfer / EAGLE), exact for point-mass drafts.

    At a node with target_probs p and children c1, c2, ...: accept c1 with probability p(A(c1)) / p(all), where A is the
    rule's relaxed set ({c1} for `Exact`); on rejection remove A(c1) from p and test c2 against that residual, and so
    on. An accepted child becomes the new node; when every child is rejected, or the node is a leaf, the bonus token is
    drawn from what is left of p. Under `Exact` each committed token is therefore distributed exactly as the target's
    warped distribution (siblings are distinct, which DraftTree guarantees); a relaxed rule moves it by at most the
    mass it claims. `neighbours` [V, k] is what a relaxed rule reads; `Exact` ignores it.
    """
    if sampling.greedy:
        raise InputError("accept_sampling needs temperature > 0; use accept_greedy for temperature 0")
    target_probs = warp(target_logits, sampling)  # [T, V]
    t = tree.size
    # Every decision of the step reads from these draws: uniform u[c] decides child c, u[0] draws the bonus token.
    uniforms = torch.rand(t, generator=generator, device=target_probs.device).tolist()
    children: list[list[int]] = [[] for _ in range(t)]
    for i, p in enumerate(tree.parents.tolist()[1:], start=1):
        children[p].append(i)

    node, path = 0, [0]
    residual = target_probs[0]
    while children[node]:
        left = 1.0  # mass of the residual: the warped rows sum to one
        for c in children[node]:
            members = rule.relaxed_set(residual, tree.tokens[c : c + 1], neighbours)  # [m] A(x) on this residual
            mass = float(residual[members].sum())
            if uniforms[c] * left < mass or mass >= left:  # the second test only absorbs rounding when A(x) is all
                node = c
                break
            residual = residual.index_fill(0, members, 0.0)
            left -= mass
        else:
            break
        path.append(node)
        residual = target_probs[node]
    bonus = inverse_cdf(residual, uniforms[0])
    path_t = torch.tensor(path, dtype=torch.long)
    drafted = tree.tokens[path_t[1:].to(tree.tokens.device)].tolist() if len(path) > 1 else []
    return Acceptance(path=path_t, tokens=tuple(drafted) + (bonus,))


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
