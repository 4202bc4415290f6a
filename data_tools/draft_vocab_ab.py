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
import time
from dataclasses import replace

import torch

import mmspec
from mmspec.bench import held_out_prompts
from mmspec.config import TreeConfig
from mmspec.draft_vocab import most_frequent
from mmspec.drafter import Drafter

logger = logging.getLogger(__name__)
COUNT_SEED = 4242  # prompts for counting tokens: neither the bench's held-out seed nor the build's small seeds


def reduced(base: Drafter, target, ids: torch.Tensor) -> Drafter:
    d = Drafter(replace(base.config, draft_vocab_size=int(ids.numel())))
    missing, unexpected = d.load_state_dict(base.state_dict(), strict=False)
    assert sorted(missing) == ["d2t", "draft_head.weight"] and not unexpected, (missing, unexpected)
    d.set_draft_vocab(ids, target.get_output_embeddings().weight)
    return d.bind(target).to(base.q_proj.weight.dtype).eval()


def head_us(d: Drafter, rows: int = 8, reps: int = 3000) -> float:
    """Median microseconds of the draft head alone (norm + LM head) on `rows` beam rows."""
    x = torch.randn(rows, d.config.hidden_size, dtype=d.q_proj.weight.dtype)
    times = []
    with torch.no_grad():
        for _ in range(reps):
            t = time.perf_counter()
            d.logits(x)
            times.append(time.perf_counter() - t)
    return 1e6 * sorted(times)[len(times) // 2]


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
    totals = {name: [0, 0, 0.0] for name in drafters}  # new tokens, target forwards, draft seconds
    for r in range(rounds):
        for k, (prompt, images) in enumerate(prompts):
            order = list(drafters) if (r + k) % 2 == 0 else list(drafters)[::-1]  # alternate: the machine drifts
            for name in order:
                pipe.drafter = drafters[name]
                s = pipe.generate(prompt, images, max_new_tokens=max_new_tokens).stats
                t = totals[name]
                t[0], t[1], t[2] = t[0] + s.new_tokens, t[1] + s.target_forwards, t[2] + s.draft_s
    rows = {}
    for name, (tokens, forwards, draft_s) in totals.items():
        steps = forwards - rounds * len(prompts)  # the prefill forward drafts nothing
        rows[name] = {"tau": tokens / forwards, "draft_ms_per_step": 1e3 * draft_s / steps,
                      "head_us_8_rows": head_us(drafters[name])}
    return {"target": "mini-vlm", "drafter": "mini-vlm-vispec", "dtype": str(base.q_proj.weight.dtype),
            "tree": vars(pipe.tree), "prompts": n_prompts, "rounds": rounds, "max_new_tokens": max_new_tokens,
            "coverage_of_counted_tokens": coverage, "threads": torch.get_num_threads(), "rows": rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab", type=int, nargs="+", default=[128, 256])
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--count-prompts", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--json", default=None)
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO)
    report = run(a.vocab, a.prompts, a.count_prompts, a.max_new_tokens, a.rounds)
    text = json.dumps(report, indent=2)
    logger.info("%s", text)
    if a.json:
        with open(a.json, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
