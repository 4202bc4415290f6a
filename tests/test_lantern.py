"""LANTERN relaxed acceptance (layers 1 and 3): the rules against a brute-force reading of their definition, the
total-variation bound, delta = 0 / lam = 1 as the exact rule, and the committed-token distribution of the whole engine
under Lantern against the analytically relaxed distribution (toy target, every continuation enumerated)."""

from __future__ import annotations

import pytest
import torch

from mmspec import DraftTree, Exact, Lantern, LanternPP, SamplingConfig, UserError
from mmspec.acceptance import point_draft
from mmspec.engine import guidance
from mmspec.image_pipeline import neighbour_table
from mmspec.verify import accept_greedy, accept_relaxed_greedy, acceptor, warp
from toy_target import ToyLM, chi_square_pvalue, pooled_engine_draws, sequence_probs


def random_case(seed: int, vocab: int = 40, k: int = 8):
    g = torch.Generator().manual_seed(seed)
    probs = torch.distributions.Dirichlet(torch.full((vocab,), 0.3)).sample((6,))  # peaky and flat rows
    codebook = torch.nn.functional.normalize(torch.randn(vocab, 4, generator=g), dim=-1)
    tokens = torch.randint(vocab, (6,), generator=g)
    return probs, tokens, neighbour_table(codebook, k)


def brute_force_mass(p: torch.Tensor, x: int, near: list[int], budget: float) -> float:
    """The definition read literally: m* = the largest m <= k with S_m within the budget."""
    best = 0
    for m in range(1, len(near) + 1):
        if sum(float(p[j]) for j in near[:m]) <= budget:
            best = m
    return float(p[x]) + sum(float(p[j]) for j in near[:best])


def relaxed_commit_probs(p: torch.Tensor, x: int, rule, neighbours) -> torch.Tensor:
    """The distribution of the committed token when x alone is drafted: x takes the mass of A(x), the rest of A(x)
    is never committed, every other token keeps p (rejection leaves it p / (1 - p(A)) times 1 - p(A))."""
    return rule.relax(p, point_draft(p, x), neighbours, rule.node_budget)[0]


@pytest.mark.parametrize("seed", range(4))
def test_relaxed_mass_follows_the_definition_and_bounds_tv(seed):
    probs, tokens, table = random_case(seed)
    for delta in (0.05, 0.2, 0.5):
        rule = Lantern(k=8, delta=delta)
        mass = rule.relaxed_mass(probs, tokens, table)
        for i in range(probs.shape[0]):
            x = int(tokens[i])
            want = brute_force_mass(probs[i], x, table[x].tolist(), delta)
            assert mass[i] == pytest.approx(want, abs=1e-6)
            q = relaxed_commit_probs(probs[i], x, rule, table)
            assert 0.5 * float((probs[i] - q).abs().sum()) <= delta + 1e-6
            assert float(q[x]) == pytest.approx(want, abs=1e-6)
    for lam in (1.5, 3.0):
        mass = LanternPP(k=8, lam=lam).relaxed_mass(probs, tokens, table)
        p_x = probs.gather(1, tokens[:, None])[:, 0]
        assert (mass <= lam * p_x + 1e-6).all() and (mass >= p_x - 1e-7).all()
        for i in range(probs.shape[0]):
            x = int(tokens[i])
            assert mass[i] == pytest.approx(brute_force_mass(probs[i], x, table[x].tolist(), (lam - 1) * float(p_x[i])),
                                            abs=1e-6)


def test_zero_relaxation_is_exact():
    probs, tokens, table = random_case(7)
    exact = Exact().relaxed_mass(probs, tokens)
    assert torch.equal(Lantern(k=8, delta=0.0).relaxed_mass(probs, tokens, table), exact)
    assert torch.equal(LanternPP(k=8, lam=1.0).relaxed_mass(probs, tokens, table), exact)
    # and some relaxation does claim mass on these rows (else the comparisons above prove nothing)
    assert (Lantern(k=8, delta=0.3).relaxed_mass(probs, tokens, table) > exact + 1e-4).any()


def test_neighbour_table_is_nearest_first_without_itself():
    codebook = torch.nn.functional.normalize(torch.randn(30, 5, generator=torch.Generator().manual_seed(0)), dim=-1)
    table = neighbour_table(codebook, 6, chunk=7)  # chunks that do not divide the codebook
    sim = codebook @ codebook.T
    for v in range(30):
        assert v not in table[v].tolist()
        order = sim[v, table[v]]
        assert (order[:-1] >= order[1:]).all()
        others = torch.cat([sim[v, :v], sim[v, v + 1 :]])
        assert float(order[0]) == pytest.approx(float(others.max()))


@pytest.mark.parametrize("bad", [dict(k=0), dict(k=2.5), dict(delta=-0.1), dict(delta=1.5), dict(delta="0.2")])
def test_lantern_refuses_bad_parameters(bad):
    with pytest.raises(UserError, match="Lantern"):
        Lantern(**bad)


@pytest.mark.parametrize("bad", [dict(lam=0.5), dict(k=-1), dict(lam=True)])
def test_lantern_pp_refuses_bad_parameters(bad):
    with pytest.raises(UserError, match="LanternPP"):
        LanternPP(**bad)


def test_relaxed_greedy():
    """Node 0's target row puts 0.4 on token 0 (its top) and 0.3 on token 2, 0.3 on token 3; token 3's nearest code
    is 2. Drafting 3: p(3) = 0.3 < 0.4 (exact greedy rejects it), but with delta 0.3 it claims 2: 0.6 >= 0.4."""
    logits = torch.log(torch.tensor([[0.4, 1e-6, 0.3, 0.3], [0.1, 0.7, 0.1, 0.1]]))
    table = torch.tensor([[1, 2, 3], [0, 2, 3], [3, 0, 1], [2, 0, 1]])
    tree = DraftTree.from_parents(torch.tensor([1, 3]), [-1, 0])
    assert accept_greedy(tree, logits).tokens == (0,)
    assert accept_relaxed_greedy(tree, logits, Lantern(k=1, delta=0.3), table).tokens == (3, 1)
    assert accept_relaxed_greedy(tree, logits, Lantern(k=1, delta=0.2), table).tokens == (0,)
    assert accept_relaxed_greedy(tree, logits, Lantern(k=1, delta=0.0), table).tokens == (0,)
    assert accept_relaxed_greedy(tree, logits, LanternPP(k=1, lam=2.0), table).tokens == (3, 1)


def test_relaxed_rule_needs_the_table():
    accept = acceptor(Lantern(k=2, delta=0.2), SamplingConfig(temperature=1.0), torch.Generator().manual_seed(0))
    tree = DraftTree.from_parents(torch.tensor([1, 3]), [-1, 0])
    with pytest.raises(UserError, match="neighbour table"):
        accept(tree, torch.zeros(2, 4))


# ---- the engine's committed-token distribution under Lantern (chain drafts, two CFG rows) -----------------------
VOCAB, NEW, DRAWS = 5, 3, 24_000
CHAIN = [-1, 0, 1, 2]
ROWS = [[1, 3, 2, 4], [1, 0]]
SAMPLING = dict(temperature=1.0)
TABLE = torch.tensor([[(v + d) % VOCAB for d in (1, 2, 3)] for v in range(VOCAB)])  # a fixed ring of neighbours
RULE = Lantern(k=2, delta=0.25)


def test_engine_commits_the_relaxed_distribution():
    """A chain proposer drafts, after each token t, the target's own top token after t alone (ranking[t][0]), so every
    committed token but the first is tested as the single drafted child x = ranking[prev][0] of its node: its
    distribution is relaxed_commit_probs(p, x). The first token is the prefill's bonus: exact."""
    model = ToyLM(VOCAB)
    ranking = model(torch.arange(VOCAB)[:, None], use_cache=False).logits[:, -1].argsort(-1, descending=True).tolist()
    combine, cfg = guidance(2.0), SamplingConfig(**SAMPLING)

    def to_probs(logits, prefix):
        p = warp(combine(logits[:, None])[0], cfg)
        return p if not prefix else relaxed_commit_probs(p, ranking[prefix[-1]][0], RULE, TABLE)

    want = sequence_probs(model, ROWS, NEW, to_probs)
    jobs = [(CHAIN, SAMPLING, 2.0, ROWS, NEW, DRAWS // 2, seed, RULE, TABLE) for seed in (1, 2)]
    counts, accepted = pooled_engine_draws(jobs)
    exact = sequence_probs(model, ROWS, NEW, lambda logits, _: warp(combine(logits[:, None])[0], cfg))
    tv = 0.5 * sum(abs(want[s] - exact[s]) for s in exact)
    assert 0.01 < tv  # the relaxation moves this target's distribution, so the test can tell the two apart
    assert accepted > DRAWS / 4
    assert chi_square_pvalue(counts, want) >= 1e-3
    assert chi_square_pvalue(counts, exact) < 1e-3
