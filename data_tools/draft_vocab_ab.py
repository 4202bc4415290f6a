"""A/B: mini-vlm's drafter with its full-vocabulary head vs the same drafter with a reduced draft vocabulary.

The reduced drafter keeps every weight and predicts over the N tokens most frequent in the target's own greedy answers
to training-distribution prompts (EAGLE-3's recipe counts the training data's learned tokens; mini-vlm's drafters
learn the target's regenerated answers), its head being those rows of the target's. No retraining, so the difference
is the head alone: its cost per draft step, and the acceptance lost where the target's token is outside the vocabulary.

    python -m mmspec.data_tools.draft_vocab_ab --vocab 128 256 --prompts 16 --json out.json
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from dataclasses import replace

import torch

import mmspec
from mmspec.bench import held_out_prompts
from mmspec.config import TreeConfig
from mmspec.draft_vocab import most_frequent
from mmspec.drafter import DraftKV, Drafter

logger = logging.getLogger(__name__)
COUNT_SEED = 4242  # prompts for counting tokens: neither the bench's held-out seed nor the build's small seeds


def reduced(base: Drafter, target, ids: torch.Tensor) -> Drafter:
    d = Drafter(replace(base.config, draft_vocab_size=int(ids.numel())))
    missing, unexpected = d.load_state_dict(base.state_dict(), strict=False)
    assert sorted(missing) == ["d2t", "draft_head.weight"] and not unexpected, (missing, unexpected)
    d.set_draft_vocab(ids, target.get_output_embeddings().weight)
    return d.bind(target).to(base.q_proj.weight.dtype).eval()


@torch.no_grad()
def depth_us(drafters: dict[str, Drafter], k: int = 4, past: int = 300, reps: int = 1500) -> dict[str, dict]:
    """Median microseconds of one draft depth as EagleProposer.grow runs it (k beam rows over a `past`-long drafter
    cache: layer forward, head, log-softmax, top-k, id map) and of the head alone, the drafters alternating rep by
    rep so a shared machine's bursts fall on all of them alike."""
    g = torch.Generator().manual_seed(0)
    any_d = next(iter(drafters.values()))
    h, dtype = any_d.config.hidden_size, any_d.q_proj.weight.dtype
    tok = torch.randint(0, any_d.config.vocab_size, (1, k), generator=g)
    feat = torch.randn(1, k, h, generator=g).to(dtype)
    pos = torch.full((1, k), past + 1)
    mask = torch.ones(1, k, past + k, dtype=torch.bool)
    caches = {}
    for name, d in drafters.items():  # each its own cache of `past` positions
        caches[name] = kv = DraftKV()
        d(torch.randint(0, d.config.vocab_size, (1, past), generator=g), torch.randn(1, past, h, generator=g).to(dtype),
          torch.arange(past)[None], None, kv)
    times = {name: ([], []) for name in drafters}
    for _ in range(reps):
        for name, d in drafters.items():
            t0 = time.perf_counter()
            hidden = d(tok, feat, pos, mask, caches[name])
            caches[name].crop(past)
            t1 = time.perf_counter()
            lp, top = torch.log_softmax(d.logits(hidden).float(), dim=-1).topk(k, dim=-1)
            d.target_ids(top)
            t2 = time.perf_counter()
            times[name][0].append(t2 - t0)
            times[name][1].append(t2 - t1)
    return {name: {"depth_us": 1e6 * statistics.median(a), "head_us": 1e6 * statistics.median(b)}
            for name, (a, b) in times.items()}


def run(vocabs: list[int], n_prompts: int, n_count: int, max_new_tokens: int, rounds: int) -> dict:
    pipe = mmspec.load("mini-vlm", device="cpu", tree=TreeConfig.preset("cpu"))
    target, base = pipe.target, pipe.drafter
    vocab = target.config.get_text_config().vocab_size
    counts = torch.zeros(vocab, dtype=torch.long)
    for prompt, images in held_out_prompts(n_count, seed=COUNT_SEED):
        out = pipe.generate(prompt, images, max_new_tokens=max_new_tokens, speculative=False).token_ids
        counts += torch.bincount(torch.tensor(out), minlength=vocab)
    drafters = {f"full ({vocab})": base}
    coverage = {}
    for n in vocabs:
        ids = most_frequent(counts, n)
        drafters[f"draft vocab {n}"] = reduced(base, target, ids)
        coverage[n] = float(counts[ids].sum()) / float(counts.sum())
    prompts = held_out_prompts(n_prompts)
    tokens = {name: [0, 0] for name in drafters}  # new tokens, target forwards
    step_ms = {name: [] for name in drafters}  # one figure per run: a shared machine's bursts hit single runs
    for r in range(rounds):
        for k, (prompt, images) in enumerate(prompts):
            order = list(drafters) if (r + k) % 2 == 0 else list(drafters)[::-1]  # alternate: the machine drifts
            for name in order:
                pipe.drafter = drafters[name]
                s = pipe.generate(prompt, images, max_new_tokens=max_new_tokens).stats
                tokens[name][0] += s.new_tokens
                tokens[name][1] += s.target_forwards
                step_ms[name].append(1e3 * s.draft_s / max(s.target_forwards - 1, 1))  # the prefill drafts nothing
    micro = depth_us(drafters)
    rows = {name: {"tau": n / f, **micro[name], "draft_ms_per_step_median_end_to_end": statistics.median(step_ms[name])}
            for name, (n, f) in tokens.items()}
    return {"target": "mini-vlm", "drafter": "mini-vlm-vispec", "dtype": str(base.q_proj.weight.dtype),
            "tree": vars(pipe.tree), "prompts": n_prompts, "rounds": rounds, "max_new_tokens": max_new_tokens,
            "distinct_counted_tokens": int((counts > 0).sum()), "coverage_of_counted_tokens": coverage,
            "threads": torch.get_num_threads(), "rows": rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab", type=int, nargs="+", default=[128, 256])
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--count-prompts", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: on a shared 2-vCPU machine two threads' "
                   "OpenMP barriers wait on each other whenever a neighbour takes a core, and swamp the difference)")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    logging.basicConfig(level=logging.INFO)
    report = run(a.vocab, a.prompts, a.count_prompts, a.max_new_tokens, a.rounds)
    text = json.dumps(report, indent=2)
    logger.info("%s", text)
    if a.json:
        with open(a.json, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
