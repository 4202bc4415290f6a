"""The auto tree for image generators (mmspec.image_autotune): the closed-form expected acceptance of a tree at
temperature 1 against the sibling recursion itself, drawn many times; and the tuner on a tiny random-weight Janus."""

from __future__ import annotations

import pytest
import torch

import mmspec
from mmspec import DraftTree, Exact, Lantern, LanternPP, TreeConfig
from mmspec.config import SamplingConfig
from mmspec.image_autotune import _Calibration, expected_accepted, tune_image_trees
from mmspec.verify import accept_sampling

# a tree whose siblings overlap in their neighbour sets, so the residual after a rejection matters
PARENTS = [-1, 0, 0, 0, 1, 1, 2, 4]
TOKENS = [0, 3, 1, 7, 2, 5, 3, 6]


@pytest.mark.parametrize("rule", [Exact(), Lantern(k=3, delta=0.3), LanternPP(k=2, lam=2.5)])
def test_expected_accepted_equals_the_sibling_recursion(rule):
    g = torch.Generator().manual_seed(0)
    vocab = 9
    logits = torch.randn(len(PARENTS), vocab, generator=g)
    for i in range(1, len(PARENTS)):  # the drafted tokens likely enough that deep nodes get reached sometimes
        logits[PARENTS[i], TOKENS[i]] += 1.5
    neighbours = torch.stack([torch.randperm(vocab, generator=g) for _ in range(vocab)])
    neighbours = torch.stack([row[row != i][:4] for i, row in enumerate(neighbours)])  # itself excluded
    tree = DraftTree.from_parents(torch.tensor(TOKENS), PARENTS)
    probs = logits.softmax(-1)
    want = sum(expected_accepted(PARENTS, tree.tokens, probs, rule, neighbours)[1:])
    sampling = SamplingConfig(temperature=1.0)
    n = 3000
    draws = torch.tensor([accept_sampling(tree, logits, sampling, g, rule, neighbours).num_accepted
                          for _ in range(n)], dtype=torch.float64)
    stderr = float(draws.std()) / n**0.5
    assert abs(float(draws.mean()) - want) < 4 * stderr + 1e-9, (float(draws.mean()), want, stderr)
    assert 0.2 < want < 3  # the tree is neither hopeless nor certain: the comparison can fail


def test_relaxed_reach_needs_the_residual():
    """With overlapping neighbour sets, testing a sibling on the full distribution instead of the residual gives a
    different (wrong) answer: the closed form is not Exact's formula in disguise."""
    g = torch.Generator().manual_seed(1)
    probs = torch.rand(4, 6, generator=g).softmax(-1)
    neighbours = torch.tensor([[1, 2], [2, 0], [1, 0], [2, 1], [5, 3], [4, 3]])
    parents, tokens = [-1, 0, 0], torch.tensor([0, 1, 2])
    rule = Lantern(k=2, delta=0.6)
    reach = expected_accepted(parents, tokens, probs, rule, neighbours)
    naive = [float(rule.relaxed_mass(probs[:1], tokens[i : i + 1], neighbours)) for i in (1, 2)]
    assert reach[1] == pytest.approx(naive[0])
    assert reach[2] != pytest.approx(naive[1])


@pytest.mark.parametrize("rule", [Exact(), Lantern(k=3, delta=0.3)])
def test_sampled_chain_reach_equals_the_chain_drawn(rule):
    """A chain whose drafts are drawn from q (EagleProposer.sample_chain) against its closed form a_1 ... a_d, on
    target rows that do not depend on the drafts (where the closed form is exact): sampled, then verified."""
    g = torch.Generator().manual_seed(2)
    vocab, depth = 7, 3
    p_logits = torch.randn(depth + 1, vocab, generator=g) * 1.5
    q = (p_logits[:depth] + torch.randn(depth, vocab, generator=g)).softmax(-1)  # a drafter near the target
    neighbours = torch.stack([torch.roll(torch.arange(vocab), -s) for s in (1, 2, 3)], dim=1)  # a ring
    paths = {c: tuple(range(c + 1)) for c in range(depth)}  # the argmax chain's node paths (any labels will do)
    rows = {paths[c][:-1]: p_logits[c].softmax(-1) for c in range(depth)}
    reach = _Calibration._chain_reach({"rows": rows}, {"chain_q": q, "paths": paths}, rule, neighbours)
    want = sum(reach.values())
    sampling, n = SamplingConfig(temperature=1.0), 3000
    draws = []
    for _ in range(n):
        drafts = torch.multinomial(q, 1, generator=g)[:, 0]
        tree = DraftTree.chain(torch.cat([torch.tensor([0]), drafts]), draft_probs=torch.cat([q[:1] * 0, q]))
        draws.append(accept_sampling(tree, p_logits, sampling, g, rule, neighbours).num_accepted)
    draws = torch.tensor(draws, dtype=torch.float64)
    stderr = float(draws.std()) / n**0.5
    assert abs(float(draws.mean()) - want) < 4 * stderr + 1e-9, (float(draws.mean()), want, stderr)
    assert 0.3 < want < 2.7


@pytest.fixture(scope="module")
def auto_pipe(tiny_dir):
    return mmspec.load(tiny_dir("janus"), drafter="untrained", device="cpu", tree=TreeConfig.preset("auto"))


def test_tuner_picks_a_valid_shape_per_rule_and_caches_it(auto_pipe, monkeypatch):
    rules = [Exact(), Lantern(k=4, delta=0.2)]
    tuned = tune_image_trees(auto_pipe, rules, "tiny-janus-test")
    for rule in rules:
        tree, entry = tuned[repr(rule)]
        assert isinstance(tree, TreeConfig) and entry["rule"] == repr(rule)
        assert entry["expected_tau"] >= 1.0 and entry["calibration"]["positions"] > 0
        assert entry["verify_ms"]["1"] > 0 and entry["draft_forward_ms"]["1"] > 0
    import mmspec.image_autotune as ia

    monkeypatch.setattr(ia, "calibrate", lambda *a, **k: pytest.fail("a cached rule was calibrated again"))
    again = tune_image_trees(auto_pipe, rules, "tiny-janus-test")
    assert {r: t for r, (t, _) in again.items()} == {r: t for r, (t, _) in tuned.items()} and len(again) == 2


def test_auto_pipeline_generates_with_the_tuned_tree(auto_pipe):
    rule = Lantern(k=4, delta=0.1)
    result = auto_pipe.generate_image("a big red circle", seed=3, acceptance=rule)
    assert repr(rule) in auto_pipe.tuned and len(result.token_ids) == 16
    tree = auto_pipe.tree_for(rule)
    assert tree == auto_pipe.tuned[repr(rule)][0]
    fixed = mmspec.load(auto_pipe.source.split(" + ")[0], drafter="untrained", device="cpu", tree=tree)
    fixed.drafter.load_state_dict(auto_pipe.drafter.state_dict())
    same = fixed.generate_image("a big red circle", seed=3, acceptance=rule)
    assert same.token_ids == result.token_ids  # the tuned tree is the one the auto pipeline drafted with
