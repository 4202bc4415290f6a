"""Jacobi drafting and drafts with a proposal distribution q (layers 1 and 3): lossless end to end on an enumerable toy
target with two CFG rows, token-identical to autoregressive decoding at temperature 0, and the relaxed rules' bound
per node, on a branching tree of point drafts and on a sampled draft."""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor

import pytest
import torch

from mmspec import DraftTree, Exact, Grouped, JacobiConfig, Lantern, LanternPP, SamplingConfig, UserError
from mmspec.acceptance import point_draft
from mmspec.engine import decode, guidance
from mmspec.image_pipeline import neighbour_table
from mmspec.jacobi import JacobiProposer
from mmspec.proposer import NullProposer
from mmspec.target import TargetRunner
from mmspec.adapters.base import TextAdapter
from mmspec.verify import accept_greedy, accept_relaxed_greedy, accept_sampling, acceptor, inverse_cdf, sibling_test
from mmspec.verify import warp
from toy_target import ToyLM, chi_square_pvalue, engine_draws, sequence_probs

VOCAB, NEW, DRAWS = 5, 3, 20_000
ROWS = [[1, 3, 2, 4], [1, 0]]  # cond and a shorter (left-padded) uncond row


def tv_bound(n: int, vocab: int, alpha: float = 1e-4) -> float:
    """How far an empirical TV over n draws can exceed the true one: E <= sqrt(V / n) / 2, and McDiarmid's deviation
    (one draw moves it by at most 1/n) at level alpha."""
    return 0.5 * (vocab / n) ** 0.5 + (torch.log(torch.tensor(1 / alpha)).item() / (2 * n)) ** 0.5


@pytest.mark.parametrize("config,sampling", [(JacobiConfig(window=2, init="left"), dict(temperature=1.0)),
                                             (JacobiConfig(window=2, init="uniform", coupled=False),
                                              dict(temperature=0.8, top_k=3))])
def test_jacobi_exact_samples_the_guided_distribution(config, sampling):
    """Every committed sequence of 3 tokens (125 outcomes) against the target's guided, warped distribution."""
    jobs = [(config, sampling, 2.0, ROWS, NEW, DRAWS // 2, seed) for seed in (1, 2)]
    with ProcessPoolExecutor(max_workers=2, mp_context=multiprocessing.get_context("spawn")) as pool:
        results = list(pool.map(engine_draws, jobs))
    counts, accepted = {}, 0
    for half, half_accepted in results:
        for seq, c in half.items():
            counts[seq] = counts.get(seq, 0) + c
        accepted += half_accepted
    combine, cfg = guidance(2.0), SamplingConfig(**sampling)
    exact = sequence_probs(ToyLM(VOCAB), ROWS, NEW, lambda logits, _: warp(combine(logits[:, None])[0], cfg))
    assert accepted > DRAWS / 10  # sampled drafts were accepted, so q-tests and cache edits were exercised
    assert chi_square_pvalue(counts, exact) >= 1e-3


def test_jacobi_greedy_equals_autoregressive():
    model = ToyLM(VOCAB)
    runner = TargetRunner(model, TextAdapter())
    inputs = {"input_ids": torch.tensor([[0, 0, 1, 3, 2, 4], [0, 0, 0, 0, 1, 0]]),
              "attention_mask": torch.tensor([[1] * 6, [0, 0, 0, 0, 1, 1]])}
    greedy = SamplingConfig(temperature=0.0)

    def run(proposer):
        accept = acceptor(Exact(), greedy, None)
        evs = list(decode(runner, proposer, inputs, accept, 12, frozenset(), combine=guidance(3.0)))
        return [t for ev in evs for t in ev.token_ids], sum(ev.num_accepted for ev in evs)

    plain, _ = run(NullProposer())
    jacobi, accepted = run(JacobiProposer(JacobiConfig(window=4), greedy, None, 12, VOCAB))
    assert jacobi == plain and accepted > 0


def branching_case():
    """One node, three drafted children whose latent neighbourhoods overlap (a ring: code v's nearest are v+1, v-1,
    v+2, ...), on a flat distribution where every child can claim a lot."""
    vocab = 10
    table = torch.tensor([[(v + d) % vocab for d in (1, -1, 2, -2, 3)] for v in range(vocab)])
    p = torch.tensor([0.04, 0.14, 0.06, 0.16, 0.1, 0.12, 0.08, 0.11, 0.09, 0.1])
    tree = DraftTree.from_parents(torch.tensor([0, 2, 4, 6]), [-1, 0, 0, 0])
    return p, table, tree


def committed_at_root(p: torch.Tensor, tree: DraftTree, rule, table) -> torch.Tensor:
    """The analytic distribution of the token committed at the root: each child's accepted mass, then the residual
    the bonus is drawn from (every drafted child is a leaf here)."""
    out, residual, budget = torch.zeros_like(p), p, rule.node_budget
    for c in tree.children[0]:
        test = sibling_test(residual, int(tree.tokens[c]), None, rule, table, budget)
        out[int(tree.tokens[c])] += test.reached * test.accept
        residual, budget = test.residual, budget - test.moved
    return out + residual


@pytest.mark.parametrize("rule", [Lantern(k=4, delta=0.15), Grouped(k=4, delta=0.15, closeness=0.2)])
def test_relaxed_rules_keep_tv_within_delta_on_a_branching_tree(rule):
    p, table, tree = branching_case()
    want = committed_at_root(p, tree, rule, table)
    tv = 0.5 * float((want - p).abs().sum())
    assert 0.05 < tv <= rule.delta + 1e-6  # the rule relaxes here, and within its one budget for all three children
    n = 8_000
    g = torch.Generator().manual_seed(3)
    logits = p.log()[None].expand(tree.size, -1)
    counts = torch.bincount(torch.tensor([accept_sampling(tree, logits, SamplingConfig(temperature=1.0), g, rule,
                                                          table).tokens[0] for _ in range(n)]), minlength=10)
    empirical = counts.double() / n
    assert 0.5 * float((empirical - p.double()).abs().sum()) <= rule.delta + tv_bound(n, 10)
    assert chi_square_pvalue({(i,): int(c) for i, c in enumerate(counts)}, {(i,): float(w) for i, w in
                                                                             enumerate(want)}) >= 1e-3


def test_lantern_pp_never_commits_more_than_lam_times_p_on_a_branching_tree():
    p, table, tree = branching_case()
    rule = LanternPP(k=4, lam=3.0)
    want = committed_at_root(p, tree, rule, table)
    assert (want <= rule.lam * p + 1e-6).all()
    drafted = tree.tokens[1:]
    assert 0.5 * float((want - p).abs().sum()) <= (rule.lam - 1) * float(p[drafted].sum()) + 1e-6
    assert (want[drafted] > p[drafted] + 1e-3).any()


@pytest.mark.parametrize("rule", [Exact(), Lantern(k=3, delta=0.2), Grouped(k=3, delta=0.2, closeness=0.3)])
def test_a_sampled_draft_commits_the_relaxed_target(rule):
    """One child drafted from q (a Jacobi draft): the committed token follows the rule's relaxed target, which is p
    under Exact and within delta of p otherwise, whatever q is."""
    vocab = 8
    codebook = torch.nn.functional.normalize(torch.randn(vocab, 3, generator=torch.Generator().manual_seed(5)), dim=-1)
    table = neighbour_table(codebook, 4)
    p = torch.tensor([0.3, 0.05, 0.2, 0.05, 0.1, 0.1, 0.15, 0.05])
    q = torch.tensor([0.05, 0.3, 0.05, 0.2, 0.1, 0.1, 0.05, 0.15])
    relaxed, moved = rule.relax(p, q, table, rule.node_budget)
    assert moved <= getattr(rule, "delta", 0.0) + 1e-6
    g = torch.Generator().manual_seed(11)
    n, counts = 8_000, torch.zeros(vocab, dtype=torch.long)
    drafts = torch.multinomial(q, n, replacement=True, generator=g).tolist()
    logits = p.log()[None].expand(2, -1)
    for x in drafts:
        tree = DraftTree.chain([0, x], draft_probs=torch.stack([q, q]))
        counts[accept_sampling(tree, logits, SamplingConfig(temperature=1.0), g, rule, table).tokens[0]] += 1
    pvalue = chi_square_pvalue({(i,): int(c) for i, c in enumerate(counts)},
                               {(i,): float(w) for i, w in enumerate(relaxed)})
    assert pvalue >= 1e-3
    if rule.relaxed:
        assert 0.01 < 0.5 * float((relaxed - p).abs().sum()) <= rule.delta + 1e-6


def test_relaxed_greedy_with_nothing_claimed_breaks_ties_as_exact_greedy():
    """Tokens 0 and 1 tie for the top; argmax takes 0, so drafting 1 is rejected by exact greedy, and must be by a
    relaxed rule that claims nothing (p~(1) = p(1) is not strictly above the top)."""
    logits = torch.log(torch.tensor([[0.4, 0.4, 0.2], [0.2, 0.2, 0.6]]))
    tree = DraftTree.from_parents(torch.tensor([2, 1]), [-1, 0])
    table = torch.tensor([[1, 2], [0, 2], [0, 1]])
    assert accept_greedy(tree, logits).tokens == (0,)
    assert accept_relaxed_greedy(tree, logits, Lantern(k=2, delta=0.0), table).tokens == (0,)
    assert accept_relaxed_greedy(tree, logits, Grouped(k=2, delta=0.0), table).tokens == (0,)


def test_residual_draw_never_returns_a_zero_probability_code():
    """u * total rounding up to the total (u = 1.0 is its limit) must land on the last code of positive weight."""
    weights = torch.tensor([0.5, 0.5, 0.0, 0.0])
    assert inverse_cdf(weights, 1.0) == 1
    assert inverse_cdf(weights, 0.0) == 0


def test_coupled_drafts_keep_their_noise_until_tested():
    """With the same proposal distributions, a coupled window redraws the same codes for the positions it did not
    test, and an uncoupled one draws fresh noise."""
    vocab, g = 16, torch.Generator().manual_seed(0)
    sampling = SamplingConfig(temperature=1.0)
    for coupled in (True, False):
        prop = JacobiProposer(JacobiConfig(window=6, coupled=coupled), sampling, g, 100, vocab)
        prop.start(None, 0, 10)
        scores = torch.randn(7, vocab, generator=g)
        first = DraftTree.root_only(torch.tensor([3]))
        prop.commit(first, accept_greedy(first, scores[:1]), None, scores)  # one node: rows 1.. carried
        a = prop.propose(torch.tensor([3]), 11)
        acc = accept_greedy(DraftTree.root_only(a.tokens[:1]), scores[:1])  # path = root only: nothing tested beyond
        prop.commit(a, acc, None, torch.cat([scores[:1], scores[2:], scores[-1:]]))  # the same q per position
        b = prop.propose(torch.tensor([3]), 12)
        same = torch.equal(a.tokens[2:7], b.tokens[1:6])
        assert same == coupled


def test_draft_parameter_is_checked():
    with pytest.raises(UserError, match="window"):
        JacobiConfig(window=0)
    with pytest.raises(UserError, match="init"):
        JacobiConfig(init="random")


def test_point_draft_has_the_residual_mass():
    r = torch.tensor([0.2, 0.1, 0.0])
    assert torch.allclose(point_draft(r, 1), torch.tensor([0.0, 0.3, 0.0]))


def test_grouped_trims_a_group_even_when_the_budget_left_rounds_below_zero():
    """The first group that does not fit keeps at least its leader: with a budget a hair below zero (what float
    rounding of the kept groups' costs can leave) the relaxation moves nothing instead of failing."""
    from mmspec.acceptance import _trimmed

    r = torch.tensor([0.3, 0.2, 0.5])
    q = torch.tensor([0.6, 0.0, 0.4])
    out, moved = _trimmed(r.clone(), r, q, torch.tensor([0, 1]), 0, -1e-9, 0.1)
    assert torch.equal(out, r) and moved == pytest.approx(0.1)
    out, moved = _trimmed(r.clone(), r, q, torch.tensor([0, 1]), 0, 1.0, 0.0)
    assert out[1] == 0 and out[0] == pytest.approx(0.5) and moved == pytest.approx(0.2)
