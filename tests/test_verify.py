"""Layers 1, 3 and 4 for acceptance: fixed logit tables for greedy, distribution tests for sampling, seeded determinism."""

import pytest
import torch
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from mmspec import DraftTree, SamplingConfig, accept_greedy, accept_sampling
from mmspec import acceptance, verify
from mmspec.acceptance import EXACT, Grouped, Lantern, LanternPP
from mmspec.verify import warp
from toy_target import chi_square_pvalue

V = 10


def onehot_logits(preds: list[int], v: int = V) -> torch.Tensor:
    """Logits of +-100: the target's argmax at node i is preds[i], with certainty."""
    logits = torch.full((len(preds), v), -100.0)
    logits[torch.arange(len(preds)), torch.tensor(preds)] = 100.0
    return logits


def test_greedy_accepts_longest_matching_path_and_bonus():
    #   root(0) -> a=3 (1) -> b=4 (3) -> c=5 (5)
    #           -> a'=6 (2) -> 7 (4)
    tree = DraftTree.from_parents(torch.tensor([1, 3, 6, 4, 7, 5]), [-1, 0, 0, 1, 2, 3])
    # target: after root 3; after 3 -> 4; after 4 -> 9 (c=5 rejected); bonus 9
    acc = accept_greedy(tree, onehot_logits([3, 4, 0, 9, 0, 0]))
    assert acc.path.tolist() == [0, 1, 3] and acc.tokens == (3, 4, 9) and acc.num_accepted == 2 and acc.bonus == 9


def test_greedy_picks_the_second_sibling():
    tree = DraftTree.from_parents(torch.tensor([1, 3, 6, 4, 7, 5]), [-1, 0, 0, 1, 2, 3])
    acc = accept_greedy(tree, onehot_logits([6, 0, 7, 0, 2, 0]))
    assert acc.path.tolist() == [0, 2, 4] and acc.tokens == (6, 7, 2)


def test_greedy_rejects_all():
    tree = DraftTree.chain([1, 2, 3])
    acc = accept_greedy(tree, onehot_logits([8, 0, 0]))
    assert acc.path.tolist() == [0] and acc.tokens == (8,)


def test_greedy_full_chain():
    tree = DraftTree.chain([1, 2, 3])
    acc = accept_greedy(tree, onehot_logits([2, 3, 4]))
    assert acc.path.tolist() == [0, 1, 2] and acc.tokens == (2, 3, 4)


@pytest.mark.parametrize("t,k,p", [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.3, 4, 1.0), (1.0, 0, 0.8), (0.9, 5, 0.6)])
def test_warp_matches_transformers(t, k, p):
    torch.manual_seed(0)
    logits = torch.randn(3, 50) * 3
    ref = TemperatureLogitsWarper(t)(None, logits.clone())
    if k:
        ref = TopKLogitsWarper(k)(None, ref)
    if p < 1:
        ref = TopPLogitsWarper(p)(None, ref)
    assert torch.allclose(warp(logits, SamplingConfig(t, k, p)), ref.softmax(-1), atol=1e-6)


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(temperature=float("nan")), dict(top_p=0), dict(top_p=1.5),
                                 dict(top_k=-2), dict(top_k=1.5)])
def test_sampling_config_rejects_bad_values(bad):
    with pytest.raises(ValueError):
        SamplingConfig(**bad)


# ---- layer 3: distributions --------------------------------------------------------------------------------------

TREES = {
    # root, two children (one of them likely, one not), a grandchild chain
    "branchy": ([0, 1, 2, 3, 4, 5], [-1, 0, 0, 1, 1, 3]),
    "chain": ([0, 1, 2, 3], [-1, 0, 1, 2]),
    "wide": ([0, 1, 2, 3, 4, 5, 6], [-1, 0, 0, 0, 0, 0, 0]),
}


def step_counts(tree: DraftTree, logits: torch.Tensor, sampling: SamplingConfig, n: int, seed: int) -> dict:
    """Run `n` acceptance steps; for every tree node the step reached, count the token committed right after it.
    A correct sampler commits, after reaching node i, a token distributed as the target's warped row i (whether it
    is an accepted child or the bonus), so every node's counts can be tested on their own."""
    g = torch.Generator().manual_seed(seed)
    child = {(int(p), int(t)): i for i, (p, t) in enumerate(zip(tree.parents, tree.tokens)) if i > 0}
    counts: dict[int, dict[int, int]] = {}
    for _ in range(n):
        node = 0
        for tok in accept_sampling(tree, logits, sampling, g).tokens:
            row = counts.setdefault(node, {})
            row[tok] = row.get(tok, 0) + 1
            node = child.get((node, tok), -1)
            if node < 0:
                break
    return counts


@pytest.mark.parametrize(
    "shape,sampling",
    [
        ("chain", SamplingConfig(0.6)),
        ("wide", SamplingConfig(1.5, top_k=5)),
        ("branchy", SamplingConfig(1.0, top_p=0.7)),
    ],
)
def test_sampling_matches_target_distribution(shape, sampling):
    tokens, parents = TREES[shape]
    # node i carries token (3 * i + 1) % V: distinct among siblings; target logits are random but fixed
    tree = DraftTree.from_parents(torch.tensor([(3 * i + 1) % V for i in range(len(tokens))]), parents)
    torch.manual_seed(1)
    logits = torch.randn(len(tokens), V) * 2
    logits[tree.parents[1:], tree.tokens[1:]] += 2.0  # drafts the target likes, so deep nodes get reached and tested
    target_probs = warp(logits, sampling)
    counts = step_counts(tree, logits, sampling, 50_000, seed=123)
    tested = 0
    for node, row in counts.items():
        if sum(row.values()) >= 1_000:  # enough draws reached this node for the chi-square approximation
            probs = {tok: float(p) for tok, p in enumerate(target_probs[node]) if p > 0}
            assert chi_square_pvalue(row, probs) >= 1e-3, f"node {node}"
            tested += 1
    assert tested >= 2  # the root and at least one deeper node


def test_sampling_accepts_certain_drafts():
    tree = DraftTree.chain([1, 2, 3])
    acc = accept_sampling(tree, onehot_logits([2, 3, 4]), SamplingConfig(1.0), torch.Generator().manual_seed(0))
    assert acc.tokens == (2, 3, 4)


def test_sampling_is_reproducible_with_a_seed():
    tokens, parents = TREES["branchy"]
    tree = DraftTree.from_parents(torch.tensor(tokens), parents)
    logits = torch.randn(len(tokens), V)
    runs = []
    for _ in range(2):
        g = torch.Generator().manual_seed(7)
        runs.append([accept_sampling(tree, logits, SamplingConfig(1.0), g).tokens for _ in range(50)])
    assert runs[0] == runs[1]


def test_sampling_refuses_temperature_zero():
    with pytest.raises(ValueError, match="accept_greedy"):
        accept_sampling(DraftTree.chain([1]), torch.zeros(1, V), SamplingConfig(0.0), torch.Generator())


class _NodeByNode:
    """A rule's decisions through the sibling-by-sibling walk: the same rule without `relax_rows` (so no chain is
    tested in one pass) and with `relaxed` set (so Exact leaves the point-draft fast path too)."""

    relaxed = True

    def __init__(self, rule):
        self.rule, self.k, self.node_budget = rule, rule.k, rule.node_budget

    def relax(self, residual, draft, neighbours, budget):
        return self.rule.relax(residual, draft, neighbours, budget)


NEIGHBOURS = torch.stack([(torch.arange(V) + s) % V for s in (1, -1, 2, -2)], dim=1)  # overlapping, nearest first
FAST = {"branchy": "_exact_walk", "wide": "_exact_walk", "chain": "_chain_walk", "sampled chain": "_chain_walk"}


@pytest.mark.parametrize("shape,rule", [(s, EXACT) for s in FAST] + [
    (s, r) for s in ("chain", "sampled chain")
    for r in (Lantern(k=3, delta=0.3), LanternPP(k=3, lam=2.0), Grouped(k=3, delta=0.3, closeness=0.2))])
def test_fast_walks_decide_draw_for_draw_as_the_sibling_walk(shape, rule, monkeypatch):
    """accept_sampling tests every child at once where the tests do not depend on each other (Exact on point drafts,
    any rule with relax_rows on a chain: two host reads a step); the general walk tests one sibling at a time. Same
    generator, same decisions: the same path and tokens, bonus included. The spy makes sure the fast walk ran."""
    tokens, parents = TREES["chain" if shape == "sampled chain" else shape]
    torch.manual_seed(3)
    drafted = torch.tensor([(3 * i + 1) % V for i in range(len(tokens))])
    draft_probs = None
    if shape == "sampled chain":  # q likes its drafts more than p does: p(x) / q(x) < 1 rejects now and then
        draft_probs = torch.softmax((torch.randn(len(tokens), V) * 2).index_put_((torch.arange(len(tokens)), drafted),
                                                                                  torch.tensor(6.0)), dim=-1)
    tree = DraftTree.from_parents(drafted, parents, draft_probs)
    logits = torch.randn(len(tokens), V) * 2
    logits[tree.parents[1:], tree.tokens[1:]] += 2.0
    calls = []
    real = getattr(verify, FAST[shape])
    monkeypatch.setattr(verify, FAST[shape], lambda *a: calls.append(1) or real(*a))
    runs = []
    for r in (rule, _NodeByNode(rule)):
        g = torch.Generator().manual_seed(11)
        runs.append([accept_sampling(tree, logits, SamplingConfig(1.0), g, r, NEIGHBOURS) for _ in range(400)])
        assert len(calls) == 400  # the fast walk ran for every step of the first run and none of the second
    assert [(a.path.tolist(), a.tokens) for a in runs[0]] == [(a.path.tolist(), a.tokens) for a in runs[1]]
    assert len({a.num_accepted for a in runs[0]}) >= 2  # accepting and rejecting both happened


@pytest.mark.parametrize("rule", [Lantern(k=3, delta=0.3), LanternPP(k=2, lam=1.5),
                                  Grouped(k=3, delta=0.05, closeness=0.3)])
def test_relax_rows_is_relax_row_by_row(rule, monkeypatch):
    """relax_rows relaxes N rows at once, in chunks when they are wide; each row as relax alone (which is relax_rows
    on one row) would. Point and sampled drafts, partial budgets; Grouped's tight delta trims groups on some rows."""
    torch.manual_seed(5)
    residual = torch.softmax(torch.randn(12, V) * 2, dim=-1) * torch.rand(12, 1)
    point = torch.zeros_like(residual).scatter_(1, torch.randint(V, (12, 1)), residual.sum(1, keepdim=True))
    sampled = torch.softmax(torch.randn(12, V) * 2, dim=-1) * residual.sum(1, keepdim=True)
    for draft in (point, sampled):
        for budget in (rule.node_budget, 0.07):
            rows, moved = rule.relax_rows(residual, draft, NEIGHBOURS, budget)
            monkeypatch.setattr(acceptance, "_CHUNK", 2 * V * (rule.k + 1))  # two rows a chunk
            chunked = rule.relax_rows(residual, draft, NEIGHBOURS, budget)
            monkeypatch.undo()
            for i in range(12):
                one, m = rule.relax(residual[i], draft[i], NEIGHBOURS, budget)
                assert torch.allclose(rows[i], one, atol=1e-7) and moved[i].item() == pytest.approx(m, abs=1e-7)
            assert torch.allclose(chunked[0], rows, atol=1e-7) and torch.allclose(chunked[1], moved, atol=1e-7)
            assert bool((moved <= budget + 1e-7).all()) and bool((moved > 0).any())
