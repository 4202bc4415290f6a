"""Layers 1, 3 and 4 for acceptance: fixed logit tables for greedy, distribution tests for sampling, seeded determinism."""

import pytest
import torch
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from mmspec import DraftTree, SamplingConfig, accept_greedy, accept_sampling
from mmspec.verify import warp

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


def total_variation(counts: torch.Tensor, probs: torch.Tensor) -> float:
    return 0.5 * (counts / counts.sum() - probs).abs().sum().item()


def run_draws(tree: DraftTree, logits: torch.Tensor, sampling: SamplingConfig, n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    first = torch.zeros(V)
    second = {}  # first token -> counts of the second token committed in the same step
    for _ in range(n):
        acc = accept_sampling(tree, logits, sampling, g)
        first[acc.tokens[0]] += 1
        if len(acc.tokens) > 1:
            second.setdefault(acc.tokens[0], torch.zeros(V))[acc.tokens[1]] += 1
    return first, second


@pytest.mark.parametrize(
    "shape,sampling,n",
    [
        ("branchy", SamplingConfig(1.0), 100_000),
        ("chain", SamplingConfig(0.6), 30_000),
        ("wide", SamplingConfig(1.5, top_k=5), 30_000),
        ("branchy", SamplingConfig(1.0, top_p=0.7), 30_000),
    ],
)
def test_sampling_matches_target_distribution(shape, sampling, n):
    tokens, parents = TREES[shape]
    # draft tokens: node i carries token (2 * i) % V so siblings differ; target logits are random but fixed
    tree = DraftTree.from_parents(torch.tensor([(2 * i + 1) % V for i in range(len(tokens))]), parents)
    torch.manual_seed(1)
    logits = torch.randn(len(tokens), V) * 2
    target_probs = warp(logits, sampling)
    first, second = run_draws(tree, logits, sampling, n, seed=123)
    bound = 3.0 * (V / n) ** 0.5  # a few standard deviations of the empirical TV for V outcomes
    assert total_variation(first, target_probs[0]) < bound
    # given the first committed token is the drafted child c, the second one must follow the target at c
    for node in range(1, tree.size):
        if int(tree.parents[node]) == 0 and int(tree.tokens[node]) in second:
            counts = second[int(tree.tokens[node])]
            assert total_variation(counts, target_probs[node]) < 3.0 * (V / counts.sum().item()) ** 0.5


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
