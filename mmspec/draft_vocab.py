"""Reduced draft vocabularies (EAGLE-3, Li et al. 2025): the drafter's LM head predicts only the N target tokens that
are most frequent in the training data, which makes the head (a [V, H] matmul every draft step) N/V as costly.

One token map, two spellings, as EAGLE-3 checkpoints store it (SpecForge writes both; vLLM and SGLang read d2t):
    d2t  [N] int64   offsets: the target id of draft id i is i + d2t[i]
    t2d  [V] bool    which target ids the draft vocabulary holds
Inside mmspec the map is the ascending list of the draft vocabulary's target ids, `ids` [N] (draft id i -> ids[i]);
d2t and t2d are derived from it, so the three can never disagree.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from .errors import InputError

logger = logging.getLogger(__name__)


def offsets(ids: Tensor) -> Tensor:
    """[N] target ids of the draft vocabulary -> d2t [N] int64 offsets."""
    return ids.long() - torch.arange(ids.numel(), dtype=torch.long, device=ids.device)


def mask(ids: Tensor, vocab_size: int) -> Tensor:
    """[N] target ids -> t2d [vocab_size] bool."""
    out = torch.zeros(vocab_size, dtype=torch.bool, device=ids.device)
    out[ids.long()] = True
    return out


def ids_from_map(d2t: Tensor, t2d: Tensor | None, vocab_size: int, where: str) -> Tensor:
    """A checkpoint's d2t (and t2d when present) -> the draft vocabulary's target ids [N], after checking that the map
    is one: integer offsets, every target id inside the target's vocabulary, no id twice, t2d marking exactly them.
    `where` names the checkpoint in errors."""
    if d2t.dim() != 1 or d2t.dtype.is_floating_point or d2t.dtype == torch.bool:
        raise InputError(f"{where}: d2t must be a 1-D integer tensor of offsets, got {d2t.dtype} {list(d2t.shape)}")
    ids = torch.arange(d2t.numel(), dtype=torch.long) + d2t.long().cpu()
    if d2t.numel() == 0 or int(ids.min()) < 0 or int(ids.max()) >= vocab_size:
        raise InputError(f"{where}: d2t maps draft ids to target ids {int(ids.min())}..{int(ids.max())}, outside the "
                         f"target's vocabulary of {vocab_size}")
    if torch.unique(ids).numel() != ids.numel():
        raise InputError(f"{where}: d2t maps two draft ids to the same target id; it is not a token map")
    if t2d is not None:
        if t2d.dim() != 1 or t2d.numel() != vocab_size:
            raise InputError(f"{where}: t2d has shape {list(t2d.shape)}, the target's vocabulary is {vocab_size}")
        if not torch.equal(t2d.cpu().bool(), mask(ids, vocab_size)):
            raise InputError(f"{where}: t2d does not mark the same target ids as d2t (the token map is inconsistent)")
    return ids


def most_frequent(counts: Tensor, n: int) -> Tensor:
    """[V] token counts -> the n most frequent target ids, ascending (EAGLE-3's recipe: the top-n tokens of the
    training data's learned positions). Ties go to the lower id, so the choice is deterministic; tokens never seen fill
    the rest in id order when the data has fewer than n distinct tokens."""
    vocab = counts.numel()
    if not 1 <= n <= vocab:
        raise InputError(f"the draft vocabulary must hold 1..{vocab} tokens (the target's vocabulary), got {n}")
    # a stable sort on -count keeps ascending ids among equal counts
    order = torch.sort(-counts.long(), stable=True).indices
    return torch.sort(order[:n]).values


def restrict_teacher(teacher_logits: Tensor, ids: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """The target's logits [..., V] over the draft vocabulary -> ([..., N] logits, valid & target top-1 inside it).

    As EAGLE-3 trains a reduced head: the teacher distribution is the target's renormalised over the draft
    vocabulary, and positions whose target top-1 lies outside it carry no loss (no draft token can be right there)."""
    inside = mask(ids.to(teacher_logits.device), teacher_logits.shape[-1])[teacher_logits.argmax(-1)]
    return teacher_logits.index_select(-1, ids.to(teacher_logits.device)), valid & inside



def choose_draft_vocab(n: int, conversations, render, vocab_size: int) -> Tensor:
    """The n most frequent learned tokens of the training conversations -> [n] ascending target ids.
    render(conversation) -> (the target's inputs, [len] bool assistant mask), as the trainer renders them."""
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for conv in conversations:
        inputs, learned = render(conv)
        counts += torch.bincount(inputs["input_ids"][0][learned].long().cpu(), minlength=vocab_size)[:vocab_size]
    ids = most_frequent(counts, n)
    logger.info("draft vocabulary: %d of %d tokens cover %.1f%% of the learned tokens", n, vocab_size,
                100 * float(counts[ids].sum()) / max(1, int(counts.sum())))
    return ids
