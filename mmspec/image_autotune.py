"""`TreeConfig.preset("auto")` for image generators: the draft-tree shape with the most codes per second for one target,
drafter, acceptance rule and machine, measured once and cached (in tuning.cache_file, beside the text entries).

Codes per second of a shape = E[codes per step] / (verify(total_tokens) + depth * draft_forward(top_k) + other).

At temperature > 0 the expected codes per step of a tree needs no sampling. The sibling recursion
(verify.accept_sampling) accepts the i-th drafted child c_i of a node with probability mass_i / left_i once the earlier
siblings are rejected, where mass_i = p_i(A(c_i)) is the mass c_i claims on the residual p_i those rejections left and
left_i is that residual's total; left_{i+1} = left_i - mass_i, so the product telescopes and P(c_i accepted) = mass_i.
A node is reached when every node on its path is accepted: E[codes per step] = 1 + the sum over drafted nodes of the
product of the acceptance probabilities on their path. In an EAGLE-2 tree a node's earlier siblings score at least as
high, so every shape that keeps a node keeps them too: the residual, and with it the node's reach, is the same in
every shape drawn from one beam.

A chain (top_k 1) at temperature > 0 draws its drafts from the drafter (EagleProposer.sample_chain), so its depth-d
draft passes with a_d = sum_x min(r_d(x), q_d(x)), r_d the (relaxed) target distribution and q_d the drafter's, and
E[codes per step] = 1 + sum_d a_1 ... a_d. The calibration reads q_d and r_d along the drafter's argmax chain, the one
path the target scores: an estimate, since a sampled chain conditions on its own draws.

The calibration walks the target's own samples of a few prompts (guidance 5, temperature 1, the defaults): at every
code the drafter grows its full beam for every width, the target scores the union of all shapes' trees in one
forward, and each shape's expectation is read off those probabilities, for every rule asked at once.
"""

from __future__ import annotations

import logging
import time

import torch
from torch import Tensor

from .config import SamplingConfig, TreeConfig
from .engine import Rows
from .target import cache_keep
from .tree import DraftTree
from .tuning import (best_shape, cache_file, cache_key, cached_tree, measure_other, read_cache, sync, verify_times,
                     write_cache)
from .verify import Acceptance, sibling_test, warp

logger = logging.getLogger(__name__)

TOP_KS = (1, 2, 4, 8, 16)
MAX_DEPTH = 5
TOTALS = (2, 3, 4, 6, 8, 12, 16, 24, 32)
CALIBRATION = {"guidance_scale": 5.0, "temperature": 1.0}
CALIBRATION_SEED = 7_777_002
MAX_POSITIONS = 96  # codes walked per prompt: enough for the statistics, bounded for 576-code targets
ESTIMATE = "sampled chains"  # what the estimates assume; a cache entry made under another assumption is not reused
PROBE_TREE = TreeConfig(depth=3, top_k=4, total_tokens=10)  # the one speculative image that measures `other`


def expected_accepted(parents: list[int], tokens: Tensor, probs: Tensor, rule, neighbours: Tensor | None) -> list[float]:
    """Reach of every node of a tree at temperature > 0 (the probability that verification accepts its whole path;
    the root 1.0). parents [T] (root -1, siblings in test order), tokens [T], probs [T, V] the warped target
    distribution at each node. The sum of the drafted nodes' reach is the expected number of drafted tokens accepted."""
    reach = [1.0] * len(parents)
    left: dict[int, tuple[Tensor, float]] = {}  # node -> (its residual, its budget) after the children tested so far
    for i in range(1, len(parents)):
        p = parents[i]
        res, budget = left.get(p, (probs[p], rule.node_budget))
        test = sibling_test(res, int(tokens[i]), None, rule, neighbours, budget)
        reach[i] = reach[p] * test.reached * test.accept
        left[p] = (test.residual, budget - test.moved)
    return reach


def _rankings(scores: Tensor, k: int) -> dict[int, list[int]]:
    """Per depth, the candidates a tree of that depth may keep, best first (select_tree's stable rerank), up to the
    largest total; a shape (depth, total) keeps the first total - 1 of its depth's list, in generation order."""
    out = {}
    for depth in range(1, MAX_DEPTH + 1):
        limit = k + (depth - 1) * k * k
        out[depth] = torch.sort(scores[:limit], descending=True, stable=True).indices[: max(TOTALS) - 1].tolist()
    return out


def _paths(tokens: list[int], parents: list[int], picked: set[int]) -> dict[int, tuple[int, ...]]:
    """Candidate index -> its token path from the root (the candidate's identity across beams of different widths)."""
    memo: dict[int, tuple[int, ...]] = {}

    def path(i: int) -> tuple[int, ...]:
        if i not in memo:
            memo[i] = (path(parents[i]) if parents[i] >= 0 else ()) + (tokens[i],)
        return memo[i]

    return {i: path(i) for i in picked}


class _Calibration:
    """Per calibration position: every width's beam (as ranked paths) and the target's distribution at each path."""

    def __init__(self) -> None:
        self.positions: list[dict] = []
        self.draft_s = {k: 0.0 for k in TOP_KS}
        self.draft_forwards = 0

    def shape_taus(self, rule, neighbours) -> dict[tuple[int, int, int], float]:
        """(top_k, depth, total) -> mean expected codes per step over the calibration positions."""
        sums: dict[tuple[int, int, int], float] = {}
        for pos in self.positions:
            for k, beam in pos["beams"].items():
                reach = self._chain_reach(pos, beam, rule, neighbours) if k == 1 else \
                    self._reach(pos, beam, rule, neighbours)
                for depth, ranked in beam["ranked"].items():
                    for total in TOTALS:
                        if total - 1 > len(ranked):  # more than the beam holds: the same tree as a smaller total
                            continue
                        key = (k, depth, total)
                        sums[key] = sums.get(key, 0.0) + 1.0 + sum(reach[i] for i in ranked[: total - 1])
        n = max(len(self.positions), 1)
        return {key: s / n for key, s in sums.items()}

    @staticmethod
    def _chain_reach(pos: dict, beam: dict, rule, neighbours) -> dict[int, float]:
        """A sampled chain's candidate index (depth - 1) -> reach, a_1 ... a_depth (see the module's docstring)."""
        q = beam["chain_q"]  # [MAX_DEPTH, V] the drafter's distribution at each depth of its argmax chain
        p = torch.stack([pos["rows"][beam["paths"][c][:-1]] for c in range(q.shape[0])])  # the target's, same nodes
        draft = q * p.sum(dim=-1, keepdim=True)
        if hasattr(rule, "relax_rows"):
            relaxed = rule.relax_rows(p, draft, neighbours, rule.node_budget)[0]
        else:
            relaxed = torch.stack([rule.relax(r, d, neighbours, rule.node_budget)[0] for r, d in zip(p, draft)])
        passes = torch.minimum(relaxed, draft).sum(dim=-1) / p.sum(dim=-1)
        return dict(enumerate(passes.cumprod(0).tolist()))

    @staticmethod
    def _reach(pos: dict, beam: dict, rule, neighbours) -> dict[int, float]:
        """Candidate index -> reach, the beam's siblings tested in generation order (as select_tree orders them)."""
        order = sorted(beam["paths"])  # generation order: every parent precedes its children
        index = {c: n for n, c in enumerate(order, start=1)}
        parents = [-1] + [index.get(beam["parents"][c], 0) for c in order]
        tokens = torch.tensor([0] + [beam["paths"][c][-1] for c in order])
        rows = pos["rows"]
        probs = torch.stack([rows[()]] + [rows.get(beam["paths"][c], rows[()]) for c in order])
        reach = expected_accepted(parents, tokens, probs, rule, neighbours)
        return {c: reach[index[c]] for c in order}


def tune_image_trees(pipe, rules: list, source: str | None) -> dict:
    """{repr(rule): (best TreeConfig, what it was chosen from)} for `pipe`; cached per rule under `source` (None:
    measure, do not cache). One calibration serves every rule not found in the cache."""
    path, out = cache_file(), {}
    keys = [cache_key(pipe, f"{source} | {rule!r} | {CALIBRATION} | {ESTIMATE}") if source else None
            for rule in rules]
    cached = read_cache(path)
    for rule, key in zip(rules, keys):
        if key and (hit := cached_tree(cached.get(key))) is not None:
            out[repr(rule)] = hit
    todo = [(rule, key) for rule, key in zip(rules, keys) if repr(rule) not in out]
    if not todo:
        return out
    t0 = time.perf_counter()
    prompt = calibration_prompts(1)[0]
    verify_ms = measure_verify(pipe, prompt)
    cal = calibrate(pipe)
    draft_ms = {k: cal.draft_s[k] * 1e3 / max(cal.draft_forwards, 1) for k in TOP_KS}
    other_ms = measure_other(pipe, lambda probe: probe.generate_image(prompt, seed=0, **CALIBRATION).stats, PROBE_TREE)
    for rule, key in todo:
        neighbours = pipe.neighbours_for(rule.k) if rule.relaxed else None
        tree, entry = best_shape(cal.shape_taus(rule, neighbours), verify_ms, draft_ms, other_ms, pipe.device, t0)
        entry.update(rule=repr(rule), calibration={**CALIBRATION, "positions": len(cal.positions)})
        if key:
            write_cache(path, key, entry)
        out[repr(rule)] = (tree, entry)
    return out


def measure_verify(pipe, prompt: str) -> dict[int, float]:
    """ms of one target forward of both CFG rows over an N-node tree after the prompt, for N in TOTALS (and 1)."""
    rows_in, _ = pipe.rows_and_combine(prompt, CALIBRATION["guidance_scale"])
    return verify_times(pipe.runner, rows_in, Rows.of(pipe.runner, rows_in), pipe.codebook_size, TOTALS)


@torch.no_grad()
def calibrate(pipe, n_prompts: int = 2) -> _Calibration:
    """Walk the target's own sample of each calibration prompt, growing every width's full beam at every code."""
    cal = _Calibration()
    sampling = SamplingConfig(temperature=CALIBRATION["temperature"])
    for i, prompt in enumerate(calibration_prompts(n_prompts)):
        codes = pipe.generate_image(prompt, seed=CALIBRATION_SEED + i, speculative=False, **CALIBRATION).token_ids
        _walk(pipe, prompt, codes[: MAX_POSITIONS + 1], sampling, cal)
    return cal


def _walk(pipe, prompt: str, codes: list[int], sampling: SamplingConfig, cal: _Calibration) -> None:
    runner = pipe.runner
    rows_in, combine = pipe.rows_and_combine(prompt, CALIBRATION["guidance_scale"])
    rows = Rows.of(runner, rows_in)
    proposers = {k: pipe.proposer(TreeConfig(depth=MAX_DEPTH, top_k=k, total_tokens=2), CALIBRATION["guidance_scale"])
                 for k in TOP_KS}
    pre = runner.prefill(rows_in, True, True, rows.positions)
    contexts = rows.drafter_contexts(pre, 0, proposers[TOP_KS[0]].rows)
    for proposer in proposers.values():
        proposer.prune = False  # every shape is read off the full beam
        proposer.start(contexts, codes[0], int(rows.next_pos[0]))
    cache, past, root_pos = pre.cache, rows_in["input_ids"].shape[1], rows.next_pos.clone()
    runner.mask.start(rows.pads)
    for j in range(len(codes) - 1):
        beams = {}
        for k, proposer in proposers.items():
            t = time.perf_counter()
            tokens, parents, scores = proposer.grow(int(root_pos[0]))
            sync(pipe.device)
            cal.draft_s[k] += time.perf_counter() - t
            ranked = _rankings(scores, k)
            picked = {c for r in ranked.values() for c in r}
            beams[k] = {"ranked": ranked, "parents": parents.tolist(),
                        "paths": _paths(tokens.tolist(), parents.tolist(), picked)}
            if k == 1:  # drafts sampled from q at temperature > 0 (CALIBRATION's): what _chain_reach reads
                beams[k]["chain_q"] = warp(torch.cat(proposer.beam_logp), sampling).float().cpu()
        cal.draft_forwards += MAX_DEPTH
        union = sorted({p for b in beams.values() for p in b["paths"].values()}, key=len)
        node = {p: n for n, p in enumerate(union, start=1)}
        node[()] = 0
        tree = DraftTree.from_parents(torch.tensor([codes[j]] + [p[-1] for p in union], device=pipe.device),
                                      [-1] + [node[p[:-1]] for p in union])
        logits, hidden = runner.verify(tree, cache, past, root_pos, True)
        probs = warp(combine(logits), sampling)
        needed = {()} | {p[:-1] for p in union}  # only parents' rows are read
        cal.positions.append({"beams": beams, "rows": {p: probs[node[p]].float().cpu() for p in needed}})
        step = Acceptance(path=torch.tensor([0]), tokens=(codes[j + 1],))
        for proposer in proposers.values():
            proposer.commit(tree, step, hidden)
        cache_keep(cache, past, torch.tensor([0]))
        past += 1
        root_pos += 1


def calibration_prompts(n: int) -> list[str]:
    from .data_tools.gen_world import prompt_of, sample_gen_scene

    g = torch.Generator().manual_seed(CALIBRATION_SEED)
    return [prompt_of(sample_gen_scene(g), g) for _ in range(n)]
