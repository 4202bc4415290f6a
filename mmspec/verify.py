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

import torch
from torch import Tensor

from .config import SamplingConfig
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


def sample_token(logits: Tensor, sampling: SamplingConfig, generator: torch.Generator | None) -> int:
    """One token from [V] logits: argmax when greedy, else a draw from the warped distribution."""
    if sampling.greedy:
        return int(logits.argmax())
    return int(torch.multinomial(warp(logits, sampling), 1, generator=generator))


def accept_greedy(tree: DraftTree, target_logits: Tensor) -> Acceptance:
    """Longest root-to-node path whose every drafted token equals the target's argmax at its parent, plus the bonus."""
    pred = target_logits.argmax(dim=-1)
    both = torch.stack([tree.tokens, pred]).cpu()  # the one host sync of the step
    tokens, pred = both[0], both[1]
    correct = torch.ones_like(tokens, dtype=torch.bool)
    correct[1:] = tokens[1:] == pred[tree.parents[1:]]
    paths = tree.paths
    ok = torch.where(paths >= 0, correct[paths.clamp(min=0)], torch.zeros((), dtype=torch.bool))
    lengths = ok.long().cumprod(dim=1).sum(dim=1)  # nodes on the path accepted so far, root included
    best = int(lengths.argmax())
    path = paths[best, : int(lengths[best])]
    last = int(path[-1])
    return Acceptance(path=path, tokens=tuple(tokens[path[1:]].tolist()) + (int(pred[last]),))


def accept_sampling(
    tree: DraftTree, target_logits: Tensor, sampling: SamplingConfig, generator: torch.Generator
) -> Acceptance:
    """Recursive rejection sampling over siblings (SpecInfer / EAGLE), exact for point-mass drafts.

    At a node with target_probs p and children c1, c2, ...: accept c1 with probability p(c1); on rejection remove c1 from
    p (the residual max(p - draft_probs, 0) for a point mass) and try c2 against the renormalised residual, and so on.
    An accepted child becomes the new node; when every child is rejected, or the node is a leaf, the bonus token is drawn
    from what is left of p. Each committed token is therefore distributed exactly as the target's warped distribution.
    """
    if sampling.greedy:
        raise ValueError("accept_sampling needs temperature > 0; use accept_greedy for temperature 0")
    target_probs = warp(target_logits, sampling)  # [T, V]
    t = tree.size
    # Every decision of the step reads from these draws: uniform u[c] decides child c.
    uniforms = torch.rand(t, generator=generator, device=target_probs.device)
    child_probs = torch.zeros(t, device=target_probs.device)
    if t > 1:
        parents_dev = tree.parents[1:].to(target_probs.device)
        child_probs[1:] = target_probs[parents_dev, tree.tokens[1:]]
    host = torch.stack([child_probs, uniforms]).cpu()
    child_probs, uniforms = host[0].tolist(), host[1].tolist()
    children: list[list[int]] = [[] for _ in range(t)]
    for i, p in enumerate(tree.parents.tolist()[1:], start=1):
        children[p].append(i)

    node, path, rejected = 0, [0], []
    while True:
        residual_mass = 1.0
        rejected = []
        for c in children[node]:
            p_c = child_probs[c]
            if residual_mass > 0 and uniforms[c] * residual_mass < p_c:
                node = c
                path.append(c)
                break
            residual_mass -= p_c
            rejected.append(c)
        else:
            break
    residual = target_probs[node]
    if rejected:
        residual = residual.clone()
        residual[tree.tokens[torch.tensor(rejected, device=tree.tokens.device)]] = 0.0
    bonus = int(torch.multinomial(residual, 1, generator=generator))
    path_t = torch.tensor(path, dtype=torch.long)
    drafted = tree.tokens[path_t[1:].to(tree.tokens.device)].tolist() if len(path) > 1 else []
    return Acceptance(path=path_t, tokens=tuple(drafted) + (bonus,))
