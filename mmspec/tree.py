"""The draft tree: one frozen value that the proposer builds and the verifier reads.

Node 0 is the root: the last committed token, which the target has not yet seen. Every other node is a drafted token whose
parent comes earlier in the order (parents[i] < i), so index order is a topological order and a node's tree position is
`depth`. The target sees the tree as a [T, T] ancestor mask appended to its causal prefix.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

from .errors import InputError


def _check_parents(parents: list[int]) -> None:
    """Node 0 is the root (-1), every other parent comes earlier (a topological order). Plain ints: this runs on every
    decoding step, where per-element tensor ops would cost more than the check."""
    if not parents or parents[0] != -1:
        raise InputError("DraftTree node 0 is the root and must have parent -1")
    if any(not 0 <= p < i for i, p in enumerate(parents[1:], start=1)):
        raise InputError(f"DraftTree.parents must satisfy 0 <= parents[i] < i for i > 0, got {parents}")


def _check_distinct_siblings(parents: list[int], tokens: list[int]) -> None:
    """Recursive rejection is exact only when a node's children carry distinct tokens: a repeated sibling would be
    tested again after its own mass was removed from the residual."""
    seen: set[tuple[int, int]] = set()
    for node, pair in enumerate(zip(parents[1:], tokens[1:]), start=1):
        if pair in seen:
            raise InputError(f"DraftTree: node {node} repeats token {pair[1]} among the children of node {pair[0]}; "
                             f"siblings must carry distinct tokens")
        seen.add(pair)


@dataclass(frozen=True)
class DraftTree:
    tokens: Tensor  # [T] long, on the model's device
    parents: Tensor  # [T] long, CPU; parents[0] == -1
    depths: Tensor  # [T] long, CPU; depths[0] == 0
    mask: Tensor  # [T, T] bool, on tokens.device; mask[i, j] is True when j is i or an ancestor of i
    paths: Tensor  # [P, max_depth + 1] long, CPU; node indices of every root-to-leaf path, padded with -1
    # [T, V] float: the distribution each drafted node was sampled from (row 0, the root, unused); None when every
    # draft is a point mass (EAGLE's deterministic top_k expansion). Jacobi windows carry it (see verify).
    draft_probs: Tensor | None = None

    def __post_init__(self) -> None:
        t = self.tokens.shape[0]
        if self.tokens.dim() != 1 or t < 1:
            raise InputError(f"DraftTree.tokens must be a non-empty 1-D tensor, got shape {tuple(self.tokens.shape)}")
        if self.parents.shape != (t,) or self.depths.shape != (t,) or self.mask.shape != (t, t):
            raise InputError(
                f"DraftTree fields disagree on the node count {t}: parents {tuple(self.parents.shape)}, "
                f"depths {tuple(self.depths.shape)}, mask {tuple(self.mask.shape)}"
            )
        if self.parents.device.type != "cpu" or self.depths.device.type != "cpu":
            raise InputError("DraftTree.parents and depths live on the CPU (the host walks them during acceptance)")
        if self.draft_probs is not None and (self.draft_probs.dim() != 2 or self.draft_probs.shape[0] != t):
            raise InputError(f"DraftTree.draft_probs must be [{t}, V], got {tuple(self.draft_probs.shape)}")
        parents = self.parents.tolist()
        _check_parents(parents)
        _check_distinct_siblings(parents, self.tokens.tolist())

    @property
    def size(self) -> int:
        return self.tokens.shape[0]

    @cached_property
    def children(self) -> list[list[int]]:
        """Each node's children, in index order (the order verification tests siblings in)."""
        out: list[list[int]] = [[] for _ in range(self.size)]
        for i, p in enumerate(self.parents.tolist()[1:], start=1):
            out[p].append(i)
        return out

    @property
    def max_depth(self) -> int:
        return self.paths.shape[1] - 1

    @classmethod
    def from_parents(cls, tokens: Tensor, parents: Tensor | list[int], draft_probs: Tensor | None = None
                     ) -> "DraftTree":
        """Derive depths, ancestor mask and paths from the parent list; the one constructor everything goes through."""
        parents = torch.as_tensor(parents, dtype=torch.long).cpu()
        if parents.dim() != 1 or parents.numel() != tokens.numel():
            raise InputError(f"parents has {parents.numel()} entries but tokens has {tokens.numel()}")
        t = parents.numel()
        # Topological order lets one pass in index order fill depths and ancestor sets. This runs on every decoding
        # step, so it walks Python ints (ancestor sets as bitmasks) and builds each tensor once: a per-node tensor
        # op costs microseconds, which a 16-node tree turned into ~0.5 ms a step.
        plist = parents.tolist()
        _check_parents(plist)  # before deriving anything from them
        depth, anc = [0] * t, [1] * t
        for i in range(1, t):
            p = plist[i]
            depth[i], anc[i] = depth[p] + 1, anc[p] | (1 << i)
        is_parent = set(plist[1:])
        leaves = [i for i in range(t) if i not in is_parent]
        width = max(depth) + 1
        rows = []
        for leaf in leaves:
            row, j = [-1] * width, leaf
            while j >= 0:  # up to the root: one ancestor per depth
                row[depth[j]] = j
                j = plist[j]
            rows.append(row)
        depths = torch.tensor(depth, dtype=torch.long)
        paths = torch.tensor(rows, dtype=torch.long)
        if t <= 63:  # the ancestor bitmasks fit an int64: unpack them in one tensor op
            mask = (torch.tensor(anc, dtype=torch.long)[:, None] >> torch.arange(t)) & 1 == 1
        else:
            mask = torch.tensor([[bool(a >> j & 1) for j in range(t)] for a in anc])
        return cls(tokens=tokens.reshape(t), parents=parents, depths=depths, mask=mask.to(tokens.device), paths=paths,
                   draft_probs=draft_probs)

    @classmethod
    def chain(cls, tokens: Tensor | list[int], device: torch.device | str | None = None,
              draft_probs: Tensor | None = None) -> "DraftTree":
        """A single path: root followed by drafted tokens (EAGLE-1 style chain, a Jacobi window, or a test oracle's
        guess)."""
        tokens = torch.as_tensor(tokens, dtype=torch.long, device=device)
        return cls.from_parents(tokens, torch.arange(-1, tokens.numel() - 1), draft_probs)

    @classmethod
    def root_only(cls, token: Tensor | int, device: torch.device | str | None = None) -> "DraftTree":
        """No draft: verifying this tree is one plain autoregressive step."""
        return cls.chain(torch.as_tensor([int(token)] if not isinstance(token, Tensor) else token.reshape(1)), device)


def select_tree(root: Tensor, tokens: Tensor, parents: Tensor, scores: Tensor, total_tokens: int) -> DraftTree:
    """EAGLE-2 rerank: keep the `total_tokens - 1` best drafted candidates by cumulative draft log-probability.

    root:    [1] long, the committed token the tree hangs from
    tokens:  [N] long, candidate tokens in generation order (every parent precedes its children)
    parents: [N] long, index of each candidate's parent among the candidates, -1 for children of the root
    scores:  [N] float, cumulative log-probability of the path root -> candidate

    A child's score never exceeds its parent's (log p <= 0), and the stable sort breaks ties by generation order, which
    puts parents first; so the kept set is always a connected subtree and no repair step is needed.
    """
    n = min(total_tokens - 1, tokens.numel())
    order = torch.sort(scores, descending=True, stable=True).indices[:n]
    keep = torch.sort(order).values.cpu()
    cand_parents = parents.cpu()[keep]
    new_index = torch.full((tokens.numel() + 1,), -1, dtype=torch.long)  # slot -1 maps the root
    new_index[-1] = 0
    new_index[keep] = torch.arange(1, n + 1)
    tree_parents = new_index[cand_parents]
    if bool((tree_parents < 0).any()):
        raise AssertionError("select_tree kept a candidate without its parent: draft scores are not monotone")
    tree_tokens = torch.cat([root.reshape(1), tokens[keep.to(tokens.device)]])
    return DraftTree.from_parents(tree_tokens, torch.cat([torch.tensor([-1]), tree_parents]))
