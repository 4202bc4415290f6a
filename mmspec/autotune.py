"""`TreeConfig.preset("auto")`: the draft-tree shape that gives the most tokens per second for one target, drafter and
machine, measured once and cached.

Tokens per second of a shape = tau / (verify(total_tokens) + depth * draft_forward(top_k) + other). Each term is
measured here, on the pipeline itself:
- verify(N): the target's forward over an N-token tree on a real prompt's cache, for N on a grid (median of 5);
- draft_forward(k) and tau: on a few calibration prompts the target's greedy continuation g is decoded once, teacher-
  forced through the target for its features, and the drafter grows its full beam (depth MAX_DEPTH, width k) from
  every position of g. A shape's tree at a position is the best total_tokens - 1 of those candidates no deeper than its
  depth (EAGLE-2's rerank), so its accepted length there is the longest run of g it holds, exactly as the verifier
  would find it at temperature 0. Walking g with those lengths gives the shape's tau without decoding again;
- other: a short speculative run's time outside drafting and verifying, per step.
The calibration images come from the shapes world, not the bench's held-out scenes. Sampling reuses the greedy choice.
"""

from __future__ import annotations

import logging
import statistics
import time

import torch

from .config import TreeConfig
from .tree import DraftTree
from .tuning import (best_shape, cache_file, cache_key, cached_tree, measure_other, read_cache, sync, verify_times,
                     write_cache)
from .verify import Acceptance

logger = logging.getLogger(__name__)

MAX_DEPTH = 7
TOP_KS = (2, 4, 6, 8)
TOTALS = (2, 3, 4, 6, 8, 10, 12, 16, 20, 24, 32, 48, 64)
CALIBRATION_SEED = 7_777_001  # neither a training seed nor the bench's held-out seed
PROBE_TREE = TreeConfig(depth=4, top_k=4, total_tokens=12)  # the short speculative run that measures `other`


def tune_tree(pipe, source: str | None, n_prompts: int = 2, max_new_tokens: int = 48) -> tuple[TreeConfig, dict]:
    """The best shape for `pipe` and what it was chosen from; cached under `source` (None: measure, do not cache)."""
    path = cache_file()
    key = cache_key(pipe, source) if source else None
    if key and (tree := cached_tree(read_cache(path).get(key))) is not None:
        return tree
    t0 = time.perf_counter()
    prompts = calibration_prompts(pipe, n_prompts)
    verify_ms = measure_verify(pipe, prompts[0])
    runs = [r for r in (teacher_forced_pools(pipe, p, max_new_tokens) for p in prompts) if len(r["tokens"]) >= 3]
    if not runs:  # the target stops at once on every calibration prompt: nothing to measure acceptance on
        logger.warning("tree auto: the target answered the calibration prompts with fewer than 3 tokens; using the "
                       "cpu shape, uncached")
        return TreeConfig.preset("cpu"), {"tree": None}
    draft_ms = {k: statistics.mean(r["draft_ms"][k] for r in runs) for k in TOP_KS}
    other_ms = measure_other(pipe, lambda probe: probe.generate(*prompts[0], max_new_tokens=max_new_tokens).stats,
                             PROBE_TREE)
    taus = {(k, depth, total): statistics.mean(simulate_tau(r["pools"][k], r["tokens"], k, depth, total) for r in runs)
            for k in TOP_KS for depth in range(1, MAX_DEPTH + 1) for total in TOTALS
            if total <= 1 + k + (depth - 1) * k * k}
    tree, entry = best_shape(taus, verify_ms, draft_ms, other_ms, pipe.device, t0)
    if key:
        write_cache(path, key, entry)
    return tree, entry


def auto_tree(pipe, source: str | None) -> TreeConfig:
    """The tuned shape for `pipe`, measured now (a few seconds on the built-in models) or read from the cache."""
    tree, entry = tune_tree(pipe, source)
    if entry["tree"] is None:
        return tree
    logger.info("tree auto: depth %d, top_k %d, total_tokens %d (expected tau %.2f, %.2fx; measured %s)", tree.depth,
                tree.top_k, tree.total_tokens, entry["expected_tau"], entry["expected_speedup"], entry["date"])
    return tree


def calibration_prompts(pipe, n: int) -> list[tuple[str, list]]:
    """Detailed-description requests; with a shapes-world scene for a VLM (one image each), text alone otherwise."""
    from .data_tools.shapes_world import render, sample_scene

    g = torch.Generator().manual_seed(CALIBRATION_SEED)
    if not pipe.adapter.multimodal:
        return [("Describe a sunny street in detail.", []), ("Explain how a bicycle works.", [])][:n]
    return [("Describe the image in detail.", [render(sample_scene(g))]) for _ in range(n)]


def _rows(pipe, prompt):
    from .engine import Rows

    inputs = pipe.prepare(*prompt)
    return inputs, Rows.of(pipe.runner, inputs)


def measure_verify(pipe, prompt) -> dict[int, float]:
    """ms of one target forward over an N-node tree after the prompt, for every N in TOTALS (and 1)."""
    inputs, rows = _rows(pipe, prompt)
    return verify_times(pipe.runner, inputs, rows, pipe.target.get_output_embeddings().weight.shape[0], TOTALS)


@torch.no_grad()
def teacher_forced_pools(pipe, prompt, max_new_tokens: int) -> dict:
    """The target's greedy continuation g, and for every width k the drafter's full beam from each position of g."""
    from .proposer import EagleProposer

    g = pipe.generate(*prompt, max_new_tokens=max_new_tokens, speculative=False).token_ids
    out = {"tokens": g, "pools": {}, "draft_ms": {}}
    if len(g) < 3:
        return out
    runner = pipe.runner
    inputs, rows = _rows(pipe, prompt)
    for k in TOP_KS:
        proposer = EagleProposer(pipe.drafter, TreeConfig(depth=MAX_DEPTH, top_k=k, total_tokens=2))
        proposer.prune = False  # every shape is read off the full beam
        pre = runner.prefill(inputs, True, proposer.needs_embeds, rows.positions)
        past = inputs["input_ids"].shape[1]
        runner.mask.start(rows.pads)
        chain = DraftTree.chain(torch.tensor(g[:-1]), device=pipe.device)  # g's features, one causal forward
        _, hidden = runner.verify(chain, pre.cache, past, rows.next_pos, True)
        proposer.start(rows.drafter_contexts(pre, runner.adapter.count_images(inputs)), g[0], int(rows.next_pos[0]))
        pools, spent = [], 0.0
        for j in range(len(g) - 1):
            t = time.perf_counter()
            tokens, parents, scores = proposer.grow(int(rows.next_pos[0]) + j)
            sync(pipe.device)
            spent += time.perf_counter() - t
            pools.append((tokens.tolist(), parents.tolist(), scores.tolist()))
            step = Acceptance(path=torch.tensor([0]), tokens=(g[j + 1],))
            proposer.commit(DraftTree.root_only(g[j], pipe.device), step, tuple(h[:, j : j + 1] for h in hidden))
        out["pools"][k] = pools
        out["draft_ms"][k] = spent * 1e3 / max(len(pools), 1) / MAX_DEPTH
    return out


def simulate_tau(pools: list, g: list[int], k: int, depth: int, total: int) -> float:
    """Tokens per step (bonus included) that the shape would commit along g at temperature 0."""
    limit = k + (depth - 1) * k * k  # candidates no deeper than `depth` come first in generation order
    j, steps = 0, 0
    while j < len(g) - 1:
        tokens, parents, scores = pools[j]
        n = min(total - 1, limit)
        kept = sorted(sorted(range(limit), key=lambda i: -scores[i])[:n])  # select_tree's stable rerank
        children = {(parents[i], tokens[i]): i for i in kept}
        node, run = -1, 0
        while j + 1 + run < len(g) and (node, g[j + 1 + run]) in children:
            node = children[(node, g[j + 1 + run])]
            run += 1
        j += run + 1
        steps += 1
    return (len(g) - 1) / max(steps, 1)
