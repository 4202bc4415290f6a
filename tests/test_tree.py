"""Layer 1: fixed tables for tree construction (DraftTree, EAGLE-2 rerank, the proposer's beam growth)."""


import pytest
import torch

import mmspec
from mmspec import DraftTree, TreeConfig
from mmspec.proposer import EagleProposer, PromptContext
from mmspec.tree import select_tree
from mmspec.verify import warp
from toy_target import BigramDrafter


def test_from_parents_derives_depths_mask_and_paths():
    #        0
    #      /   \
    #     1     2
    #    / \    |
    #   3   4   5
    #   |
    #   6
    tree = DraftTree.from_parents(torch.arange(10, 17), [-1, 0, 0, 1, 1, 2, 3])
    assert tree.depths.tolist() == [0, 1, 1, 2, 2, 2, 3]
    assert tree.mask[6].nonzero().flatten().tolist() == [0, 1, 3, 6]
    assert tree.mask[5].nonzero().flatten().tolist() == [0, 2, 5]
    assert not tree.mask[1, 2] and not tree.mask[3, 4]
    assert sorted(tree.paths.tolist()) == sorted([[0, 1, 3, 6], [0, 1, 4, -1], [0, 2, 5, -1]])
    assert tree.max_depth == 3


@pytest.mark.parametrize("t", [16, 63, 64, 100])  # 64 and up no longer fit the ancestor bitmask in an int64
def test_random_trees_match_a_plain_ancestor_walk(t):
    g = torch.Generator().manual_seed(t)
    parents = [-1] + [int(torch.randint(0, i, (1,), generator=g)) for i in range(1, t)]
    tree = DraftTree.from_parents(torch.arange(t), parents)
    for i in range(t):
        chain, j = [], i
        while j >= 0:
            chain.append(j)
            j = parents[j]
        assert tree.mask[i].nonzero().flatten().tolist() == sorted(chain)
        assert int(tree.depths[i]) == len(chain) - 1
    leaves = sorted(set(range(t)) - set(parents))
    assert sorted(tuple(x for x in row if x >= 0) for row in tree.paths.tolist()) == sorted(
        tuple(tree.mask[leaf].nonzero().flatten().tolist()) for leaf in leaves)


@pytest.mark.parametrize("parents", [[0, 0], [-1, 1], [-1, 2, 0], [-1, 0, -1]])
def test_invalid_parents_are_refused(parents):
    with pytest.raises(ValueError, match="parent"):
        DraftTree.from_parents(torch.arange(len(parents)), parents)


def test_duplicate_siblings_are_refused():
    """Recursive rejection removes a rejected sibling's token from the residual; a repeat would be tested again against
    mass it no longer has, so the tree refuses it (cousins may share a token)."""
    with pytest.raises(mmspec.UserError, match="node 2 repeats token 5 among the children of node 0"):
        DraftTree.from_parents(torch.tensor([1, 5, 5]), [-1, 0, 0])
    ok = DraftTree.from_parents(torch.tensor([1, 5, 6, 7, 7]), [-1, 0, 0, 1, 2])
    with pytest.raises(mmspec.UserError, match="repeats token 7"):
        DraftTree(ok.tokens, torch.tensor([-1, 0, 0, 1, 1]), ok.depths, ok.mask, ok.paths)  # built by hand


def test_frozen_tree_checks_field_shapes():
    tree = DraftTree.chain([1, 2, 3])
    with pytest.raises(ValueError, match="disagree"):
        DraftTree(tree.tokens, tree.parents, tree.depths, tree.mask[:2], tree.paths)
    with pytest.raises(Exception):
        tree.tokens = torch.zeros(3)  # frozen


def test_chain_and_root_only():
    chain = DraftTree.chain([5, 6, 7])
    assert chain.parents.tolist() == [-1, 0, 1] and chain.paths.tolist() == [[0, 1, 2]]
    root = DraftTree.root_only(9)
    assert root.size == 1 and root.paths.tolist() == [[0]]


@pytest.mark.parametrize(
    "kw", [dict(depth=0), dict(top_k=-1), dict(total_tokens=0), dict(depth=1, top_k=2, total_tokens=4), dict(depth=1.5)]
)
def test_tree_config_validation(kw):
    with pytest.raises(ValueError):
        TreeConfig(**kw)


def test_tree_presets():
    assert TreeConfig.preset("gpu") == TreeConfig(depth=6, top_k=10, total_tokens=60)
    with pytest.raises(ValueError, match="preset"):
        TreeConfig.preset("huge")


def test_select_tree_keeps_best_connected_subtree():
    # candidates: depth 1: a(0) b(1); depth 2 children of a: c(2) d(3), of b: e(4)
    tokens = torch.tensor([10, 11, 12, 13, 14])
    parents = torch.tensor([-1, -1, 0, 0, 1])
    scores = torch.tensor([-0.1, -1.0, -0.3, -2.0, -1.2])
    tree = select_tree(torch.tensor([99]), tokens, parents, scores, total_tokens=4)
    assert tree.tokens.tolist() == [99, 10, 11, 12]  # a, b, c: the three best, in generation order
    assert tree.parents.tolist() == [-1, 0, 0, 1]


def test_select_tree_ties_keep_parents_first():
    # logits of +-100 give log-probs of exactly 0: child scores tie with their parents
    tokens = torch.tensor([1, 2, 3, 4])
    parents = torch.tensor([-1, -1, 0, 2])
    scores = torch.tensor([0.0, -200.0, 0.0, 0.0])
    tree = select_tree(torch.tensor([0]), tokens, parents, scores, total_tokens=4)
    assert tree.tokens.tolist() == [0, 1, 3, 4] and tree.parents.tolist() == [-1, 0, 1, 2]


def successor_table(v: int = 8) -> tuple[int, torch.Tensor]:
    """Draft logits from every token t: best next is t+1, second best t+2 (mod v), the rest -100."""
    table = torch.full((v, v), -100.0)
    for t in range(v):
        table[t, (t + 1) % v] = 100.0
        table[t, (t + 2) % v] = 99.0
    return v, table


def test_eagle_proposer_grows_the_expected_tree():
    v, table = successor_table()
    drafter = BigramDrafter(table)
    prop = EagleProposer(drafter, TreeConfig(depth=3, top_k=2, total_tokens=6))
    prompt = PromptContext(torch.tensor([0, 1]), torch.arange(2), (torch.zeros(1, 2, v),))
    prop.start(prompt, first_token=2, first_pos=2)
    tree = prop.propose(torch.tensor([2]), root_pos=2)
    assert drafter.calls == 3 and prop.kv.length == 2  # drafted slots cropped back to the committed pairs
    # depth 1: 3 (score 0), 4 (-1); depth 2 from 3: 4 (0), 5 (-1); from 4: 5 (-1), 6 (-2) -> beam {3->4, 3->5}
    # depth 3 from 3->4: 5 (0), 6 (-1); rerank keeps 5 best: 3, 4, 3->4, 3->4->5, then the -1 ties in generation order.
    assert tree.tokens.tolist() == [2, 3, 4, 4, 5, 5]
    assert tree.parents.tolist() == [-1, 0, 0, 1, 1, 3]
    assert tree.depths.tolist() == [0, 1, 1, 2, 2, 3]


def test_drafting_stops_when_no_deeper_candidate_can_enter_the_tree():
    """Scores a (best) and b (second) per depth: after depth 2 the candidates are a, b, 2a, a+b, a+b, 2b; keeping 2,
    the 2nd best is 2a and the best beam score is 2a too, so every depth-3 candidate (<= 2a, generated later) loses the
    tie: the proposer stops after 2 forwards and returns the full-depth tree. A beam score above it keeps drafting."""
    v, table = successor_table()
    prompt = PromptContext(torch.tensor([0, 1]), torch.arange(2), (torch.zeros(1, 2, v),))
    trees = {}
    for prune in (True, False):
        drafter = BigramDrafter(table)
        prop = EagleProposer(drafter, TreeConfig(depth=3, top_k=2, total_tokens=3))
        prop.prune = prune
        prop.start(prompt, first_token=2, first_pos=2)
        tree = prop.propose(torch.tensor([2]), root_pos=2)
        trees[prune] = (tree.tokens.tolist(), tree.parents.tolist(), drafter.calls)
    assert trees[True] == ([2, 3, 4], [-1, 0, 1], 2) and trees[False] == ([2, 3, 4], [-1, 0, 1], 3)
    # keeping 3 the 3rd best is b < 2a: a depth-3 child (3a) could still enter, so all 3 forwards run
    drafter = BigramDrafter(table)
    prop = EagleProposer(drafter, TreeConfig(depth=3, top_k=2, total_tokens=4))
    prop.start(prompt, first_token=2, first_pos=2)
    prop.propose(torch.tensor([2]), root_pos=2)
    assert drafter.calls == 3


def test_a_depth_one_tree_is_the_roots_best_children():
    """depth=1 (a shape the auto tuner may pick for a weak drafter): the catch-up forward alone, top_k children."""
    v, table = successor_table()
    drafter = BigramDrafter(table)
    prop = EagleProposer(drafter, TreeConfig(depth=1, top_k=2, total_tokens=3))
    prop.start(PromptContext(torch.tensor([0, 1]), torch.arange(2), (torch.zeros(1, 2, v),)), first_token=2, first_pos=2)
    tree = prop.propose(torch.tensor([2]), root_pos=2)
    assert tree.tokens.tolist() == [2, 3, 4] and tree.parents.tolist() == [-1, 0, 0] and drafter.calls == 1


def test_a_sampled_chain_carries_the_distribution_each_draft_was_drawn_from():
    """Above temperature 0 a top_k-1 tree is a chain drawn from the drafter: each node's draft_probs is the drafter's
    warped distribution given the drafts before it, and the node's token was drawn from it (seeded)."""
    v = 6
    table = torch.randn(v, v, generator=torch.Generator().manual_seed(0))
    sampling = mmspec.SamplingConfig(temperature=0.7, top_k=4)
    prompt = PromptContext(torch.tensor([0, 1]), torch.arange(2), (torch.zeros(1, 2, v),))

    def chain(seed: int, tree=TreeConfig(depth=3, top_k=1, total_tokens=4)) -> tuple[DraftTree, BigramDrafter, EagleProposer]:
        drafter = BigramDrafter(table)
        prop = EagleProposer(drafter, tree, sampling=sampling, generator=torch.Generator().manual_seed(seed))
        prop.start(prompt, first_token=2, first_pos=2)
        return prop.propose(torch.tensor([2]), root_pos=2), drafter, prop

    tree, drafter, prop = chain(0)
    assert tree.parents.tolist() == [-1, 0, 1, 2] and drafter.calls == 3 and prop.kv.length == 2
    tokens = tree.tokens.tolist()
    for node in (1, 2, 3):
        assert torch.allclose(tree.draft_probs[node], warp(table[tokens[node - 1]], sampling))
        assert tree.draft_probs[node][tokens[node]] > 0  # drawn from it: never outside the warp's top_k
    assert len({tuple(chain(s)[0].tokens.tolist()) for s in range(12)}) > 1  # drawn, not the argmax chain
    assert chain(0)[0].tokens.tolist() == tokens  # the seeded generator gives the same chain
    short, _, _ = chain(0, TreeConfig(depth=3, top_k=1, total_tokens=3))
    assert short.tokens.tolist() == tokens[:3]  # total_tokens caps the drafts, not only the tree kept


def test_greedy_and_wide_trees_grow_the_beam_whatever_the_sampling():
    v, table = successor_table()
    for sampling, tree in ((mmspec.SamplingConfig(temperature=0.0), TreeConfig(depth=2, top_k=1, total_tokens=3)),
                           (mmspec.SamplingConfig(temperature=1.0), TreeConfig(depth=2, top_k=2, total_tokens=3))):
        prop = EagleProposer(BigramDrafter(table), tree, sampling=sampling, generator=torch.Generator())
        prop.start(PromptContext(torch.tensor([0, 1]), torch.arange(2), (torch.zeros(1, 2, v),)), 2, 2)
        out = prop.propose(torch.tensor([2]), root_pos=2)
        assert out.draft_probs is None and out.tokens.tolist()[:2] == [2, 3]
