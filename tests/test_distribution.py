"""Layer 3 end to end: sampled output through the whole engine (prefill, draft tree, 4-D mask, KV-cache edits, rows,
acceptance) is distributed exactly as the target's warped distribution.

The target is `ToyLM` (see toy_target.py), vocabulary 5: all 5**3 three-token continuations are enumerated for the
exact distribution, 5e4 generations are drawn, and Pearson's chi-square test must not reject at p < 0.001. One case
verifies two classifier-free-guidance rows of different lengths (left padding) with one tree.
"""

import multiprocessing
from concurrent.futures import ProcessPoolExecutor

import pytest

from mmspec import SamplingConfig, TreeConfig
from mmspec.engine import first_row, guidance
from mmspec.verify import warp
from toy_target import ToyLM, chi_square_pvalue, engine_draws, pooled_engine_draws, sequence_probs

VOCAB, NEW, DRAWS = 5, 3, 50_000
SHAPES = {
    "chain": [-1, 0, 1, 2],
    "branchy": [-1, 0, 0, 1, 1, 3],
    "wide": [-1, 0, 0, 0, 0, 1],
}


# Three shapes, three temperatures, top_k and top_p, and one case with two CFG rows (the uncond row shorter, so
# left-padded). Each case's draws are split over two processes: this machine has two cores.
CASES = [
    ("chain", dict(temperature=1.0, top_p=0.8), None),
    ("branchy", dict(temperature=0.7, top_k=3), None),
    ("wide", dict(temperature=1.3), 3.0),
]
ROWS = {None: [[1, 3, 2, 4]], 3.0: [[1, 3, 2, 4], [1, 0]]}


@pytest.fixture(scope="module")
def draws():
    jobs = [(SHAPES[shape], sampling, scale, ROWS[scale], NEW, DRAWS // 2, seed)
            for shape, sampling, scale in CASES for seed in (1, 2)]
    with ProcessPoolExecutor(max_workers=2, mp_context=multiprocessing.get_context("spawn")) as pool:
        results = list(pool.map(engine_draws, jobs))
    return [(results[2 * i], results[2 * i + 1]) for i in range(len(CASES))]


@pytest.mark.parametrize("case", range(len(CASES)), ids=[f"{c[0]}-{'cfg' if c[2] else 'one-row'}" for c in CASES])
def test_engine_samples_the_target_distribution(draws, case):
    shape, sampling, scale = CASES[case]
    combine = first_row if scale is None else guidance(scale)
    warp_cfg = SamplingConfig(**sampling)
    exact = sequence_probs(ToyLM(VOCAB), ROWS[scale], NEW, lambda logits, _: warp(combine(logits[:, None])[0], warp_cfg))
    counts, accepted = {}, 0
    for half_counts, half_accepted in draws[case]:
        for seq, c in half_counts.items():
            counts[seq] = counts.get(seq, 0) + c
        accepted += half_accepted
    assert sum(counts.values()) >= 50_000
    assert accepted > DRAWS / 4  # multi-token paths were accepted, so the cache edits were exercised
    assert chi_square_pvalue(counts, exact) >= 1e-3


@pytest.mark.parametrize("sampling,scale", [(dict(temperature=1.0, top_p=0.9), None), (dict(temperature=0.8, top_k=3), 3.0)],
                         ids=["one-row", "cfg"])
def test_sampled_drafter_chains_sample_the_target_distribution(sampling, scale):
    """An EAGLE chain (top_k 1) above temperature 0 draws each draft from its drafter's warped distribution q and is
    verified with min(1, p / q) (EagleProposer.sample_chain): its output is still the target's distribution."""
    draws = 12_000
    chain = TreeConfig(depth=3, top_k=1, total_tokens=4)
    rows = [[1, 3, 2, 4]] if scale is None else [[1, 3, 2, 4], [1, 0, 2, 0]]  # a drafter reads rows of one length
    counts, accepted = pooled_engine_draws([(chain, sampling, scale, rows, NEW, draws // 2, s) for s in (1, 2)])
    combine, cfg = (first_row if scale is None else guidance(scale)), SamplingConfig(**sampling)
    exact = sequence_probs(ToyLM(VOCAB), rows, NEW, lambda logits, _: warp(combine(logits[:, None])[0], cfg))
    assert accepted > draws / 4  # drafts passed their q-tests, so the chains' cache edits were exercised too
    assert chi_square_pvalue(counts, exact) >= 1e-3
