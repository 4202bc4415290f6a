"""The one generation loop. Speculative and plain autoregressive decoding are the same loop; only the proposer differs.

    prefill -> first token -> [propose tree -> verify in one target forward -> accept -> keep accepted KV -> commit]*

Each turn of the bracket yields a StepEvent. Stopping matches transformers' generate: a token in the generation config's
EOS set ends the output (and is included), even when it lands in the middle of an accepted path; max_new_tokens cuts
exactly.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import Tensor

from .config import SamplingConfig
from .proposer import PromptContext
from .target import TargetRunner, cache_keep
from .tree import DraftTree
from .verify import accept_greedy, accept_sampling, sample_token


@dataclass
class Stats:
    new_tokens: int = 0
    target_forwards: int = 0  # prefill included: it commits the first token
    draft_forwards: int = 0
    wall_s: float = 0.0
    draft_s: float = 0.0
    verify_s: float = 0.0
    prefill_s: float = 0.0

    @property
    def mean_accepted(self) -> float:
        """tau: tokens committed per target forward, bonus token included (1.0 for autoregressive decoding)."""
        return self.new_tokens / max(self.target_forwards, 1)

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def other_s(self) -> float:
        """Time outside drafting, verifying and prefill: acceptance, cache edits, bookkeeping."""
        return max(self.wall_s - self.draft_s - self.verify_s - self.prefill_s, 0.0)

    def as_dict(self) -> dict:
        return {
            "new_tokens": self.new_tokens,
            "target_forwards": self.target_forwards,
            "draft_forwards": self.draft_forwards,
            "mean_accepted": self.mean_accepted,
            "wall_s": self.wall_s,
            "tokens_per_s": self.tokens_per_s,
            "prefill_s": self.prefill_s,
            "draft_s": self.draft_s,
            "verify_s": self.verify_s,
            "other_s": self.other_s,
        }


@dataclass(frozen=True)
class StepEvent:
    token_ids: tuple[int, ...]  # committed this step
    num_accepted: int  # drafted tokens accepted this step (0 for the prefill step and for autoregressive steps)
    tree_size: int  # tokens the target verified this step
    finished: bool  # the last event of the run
    stats: Stats = field(compare=False)


def _sync(device: torch.device) -> None:
    # Honest timing on an asynchronous device: the split into draft / verify needs the work to have finished.
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def decode(
    runner: TargetRunner,
    proposer,
    inputs: dict,
    prompt_positions: Tensor,
    next_pos: int,
    sampling: SamplingConfig,
    max_new_tokens: int,
    stop_ids: frozenset[int],
    generator: torch.Generator | None,
) -> Iterator[StepEvent]:
    """Run the loop; `prompt_positions` are the prompt's 1-D target positions and `next_pos` the position of the first
    new token (they differ from the token index for M-RoPE targets)."""
    stats = Stats()
    dev = runner.device
    t0 = time.perf_counter()
    want_hidden = proposer.needs_features
    pre = runner.prefill(inputs, want_hidden, getattr(proposer, "needs_embeds", False))
    token = sample_token(pre.logits, sampling, generator)
    _sync(dev)
    stats.prefill_s = time.perf_counter() - t0
    stats.target_forwards = 1
    stats.new_tokens = 1
    stats.wall_s = time.perf_counter() - t0
    finished = token in stop_ids or max_new_tokens == 1
    yield StepEvent((token,), 0, inputs["input_ids"].shape[1], finished, stats)
    if finished:
        return

    cache = pre.cache
    past = inputs["input_ids"].shape[1]
    embeds = None if pre.input_embeds is None else pre.input_embeds[0]
    prompt = PromptContext(inputs["input_ids"][0], prompt_positions, pre.hidden_states, embeds,
                           runner.adapter.count_images(inputs))
    proposer.start(prompt, token, next_pos)
    del pre, prompt
    accept = accept_greedy if sampling.greedy else (lambda tr, lg: accept_sampling(tr, lg, sampling, generator))
    root = torch.tensor([token], device=dev)
    root_pos = next_pos
    while True:
        t_step = time.perf_counter()
        tree: DraftTree = proposer.propose(root, root_pos)
        _sync(dev)
        t_draft = time.perf_counter()
        logits, hidden = runner.verify(tree, cache, past, root_pos, want_hidden)
        _sync(dev)
        t_verify = time.perf_counter()
        acc = accept(tree, logits)
        cache_keep(cache, past, acc.path)
        proposer.commit(tree, acc, hidden)
        past += acc.path.numel()
        root_pos += acc.path.numel()

        committed = list(acc.tokens[: max_new_tokens - stats.new_tokens])
        stop = next((i for i, t in enumerate(committed) if t in stop_ids), None)
        if stop is not None:
            committed = committed[: stop + 1]
        stats.draft_s += t_draft - t_step
        stats.verify_s += t_verify - t_draft
        stats.draft_forwards += getattr(proposer, "forwards_per_step", 0)
        stats.target_forwards += 1
        stats.new_tokens += len(committed)
        stats.wall_s = time.perf_counter() - t0
        finished = stop is not None or stats.new_tokens >= max_new_tokens
        yield StepEvent(tuple(committed), min(acc.num_accepted, len(committed)), tree.size, finished, stats)
        if finished:
            return
        root = torch.tensor([acc.bonus], device=dev)
