"""The one generation loop. Speculative and plain autoregressive decoding are the same loop; only the proposer differs.

    prefill -> first token -> [propose tree -> verify (all rows, one forward) -> combine rows -> process per node
                               -> accept -> keep accepted KV -> commit]*

Each turn of the bracket yields a StepEvent. Stopping matches transformers' generate: a token in the generation config's
EOS set ends the output (and is included), even when it lands in the middle of an accepted path; max_new_tokens cuts
exactly.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import Tensor

from .processing import NodeProcessor
from .proposer import PromptContext
from .target import Prefill, TargetRunner, cache_keep
from .tree import DraftTree
from .verify import Acceptor


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
    tree: DraftTree | None = field(default=None, compare=False)  # the tree verified this step (None: the prefill)
    path: tuple[int, ...] = ()  # its accepted nodes, root first (what a demo draws)


def _sync(device: torch.device) -> None:
    # Honest timing on an asynchronous device: the split into draft / verify needs the work to have finished.
    if device.type == "cuda":
        torch.cuda.synchronize(device)


Combine = Callable[[Tensor], Tensor]  # [B, T, V] logits of the rows -> [T, V] the acceptance rule sees


def first_row(logits: Tensor) -> Tensor:
    return logits[0]


def guidance(scale: float) -> Combine:
    """Classifier-free guidance over rows (cond, uncond): uncond + scale * (cond - uncond)."""
    return lambda logits: logits[1] + scale * (logits[0] - logits[1])


@dataclass(frozen=True)
class Rows:
    """The B prompt rows of one generation, left-padded to one length; row 0 is the one the drafter reads and whose
    history the processors see."""

    positions: Tensor  # [B, n] 1-D target positions of every row's prompt tokens
    next_pos: Tensor  # [B] long, CPU: each row's position of its first new token
    pads: list[int]  # left-padding columns per row
    ids: Tensor  # [B, n] the rows as given, padding included

    @classmethod
    def of(cls, runner: TargetRunner, inputs: dict) -> "Rows":
        ids, mask = inputs["input_ids"], inputs.get("attention_mask")
        positions, next_pos = runner.adapter.row_positions(runner.model, inputs)
        pads = [0] * ids.shape[0] if mask is None else (mask.shape[1] - mask.long().sum(-1)).tolist()
        return cls(positions, next_pos, pads, ids)

    @property
    def prompt_ids(self) -> Tensor:
        """[n0] row 0 without its padding: the history the processors read."""
        return self.ids[0, self.pads[0]:]

    def drafter_contexts(self, pre: Prefill, n_images: int, count: int = 1) -> list[PromptContext]:
        """What the drafter reads of the prefill: the first `count` rows, each without its padding."""
        out = []
        for r in range(count):
            p = self.pads[r]
            embeds = None if pre.input_embeds is None else pre.input_embeds[r, p:]
            hidden = None if pre.hidden_states is None else tuple(h[r : r + 1, p:] for h in pre.hidden_states)
            out.append(PromptContext(self.ids[r, p:], self.positions[r, p:], hidden, embeds, n_images))
        return out


def decode(
    runner: TargetRunner,
    proposer,
    inputs: dict,
    accept: Acceptor,
    max_new_tokens: int,
    stop_ids: frozenset[int],
    process: NodeProcessor | None = None,
    combine: Combine = first_row,
) -> Iterator[StepEvent]:
    """Run the loop over B rows of `inputs` (left-padded, with an attention_mask when B > 1) that share one draft tree:
    every target forward covers all rows, `combine` turns their logits into one [T, V], `process` applies the
    generation_config per node, and `accept` (see verify.acceptor) picks the committed tokens."""
    stats = Stats()
    dev = runner.device
    t0 = time.perf_counter()
    want_hidden = proposer.needs_features
    rows = Rows.of(runner, inputs)
    pre = runner.prefill(inputs, want_hidden, getattr(proposer, "needs_embeds", False), rows.positions)
    # The first token is the bonus of a root-only tree over the prompt's last token.
    root_tree = DraftTree.root_only(rows.prompt_ids[-1:])
    scores = combine(pre.logits[:, None])
    if process:
        scores = process(root_tree, scores, rows.prompt_ids[:-1])
    token = accept(root_tree, scores).bonus
    _sync(dev)
    stats.prefill_s = time.perf_counter() - t0
    stats.target_forwards = 1
    stats.new_tokens = 1
    stats.wall_s = time.perf_counter() - t0
    past = inputs["input_ids"].shape[1]
    finished = token in stop_ids or max_new_tokens == 1
    yield StepEvent((token,), 0, past, finished, stats)
    if finished:
        return

    cache = pre.cache
    contexts = rows.drafter_contexts(pre, runner.adapter.count_images(inputs), getattr(proposer, "rows", 1))
    proposer.start(contexts, token, int(rows.next_pos[0]))
    del pre
    runner.mask.start(rows.pads)
    history = rows.prompt_ids  # tokens before the root, read by the processors only
    root = torch.tensor([token], device=dev)
    root_pos = rows.next_pos.clone()  # [B] each row's position of the root
    while True:
        t_step = time.perf_counter()
        drafted_before = proposer.forwards
        tree: DraftTree = proposer.propose(root, int(root_pos[0]))
        _sync(dev)
        t_draft = time.perf_counter()
        logits, hidden = runner.verify(tree, cache, past, root_pos, want_hidden)
        _sync(dev)
        t_verify = time.perf_counter()
        scores = combine(logits)
        if process:
            scores = process(tree, scores, history)
        acc = accept(tree, scores)
        if process:  # the root and the accepted drafted tokens join the history; the bonus is the next root
            history = torch.cat([history, tree.tokens[acc.path.to(dev)]])
        cache_keep(cache, past, acc.path)
        proposer.commit(tree, acc, hidden, scores)
        past += acc.path.numel()
        root_pos += acc.path.numel()

        committed = list(acc.tokens[: max_new_tokens - stats.new_tokens])
        stop = next((i for i, t in enumerate(committed) if t in stop_ids), None)
        if stop is not None:
            committed = committed[: stop + 1]
        stats.draft_s += t_draft - t_step
        stats.verify_s += t_verify - t_draft
        stats.draft_forwards += proposer.forwards - drafted_before
        stats.target_forwards += 1
        stats.new_tokens += len(committed)
        stats.wall_s = time.perf_counter() - t0
        finished = stop is not None or stats.new_tokens >= max_new_tokens
        yield StepEvent(tuple(committed), min(acc.num_accepted, len(committed)), tree.size, finished, stats, tree,
                        tuple(acc.path.tolist()))
        if finished:
            return
        root = torch.tensor([acc.bonus], device=dev)
