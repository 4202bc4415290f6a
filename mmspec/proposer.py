"""Proposers: what grows the draft tree each step. The generation loop talks to one through three calls:

    start(prompt)                        after the target's prefill: prompt tokens, their target features and positions
    propose(root, root_pos) -> DraftTree  the tree to verify next, hanging from the last committed token
    commit(tree, acceptance, features, scores)  the accepted path's target features, so the drafter can catch up, and
                                         the verify's processed logits [T, V] (what a Jacobi window refines)
    forwards                             drafter forwards run so far (the loop reports the difference per step)

`NullProposer` proposes the root alone, which makes the loop plain autoregressive decoding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .config import SamplingConfig, TreeConfig
from .drafter import DraftKV, Drafter
from .errors import InputError
from .tree import DraftTree, select_tree
from .verify import Acceptance, warp
from .vision import plan_compression


@dataclass
class PromptContext:
    input_ids: Tensor  # [n] long, the prompt as the target saw it
    positions: Tensor  # [n] long, 1-D target positions of the prompt tokens (the temporal/max row for M-RoPE)
    hidden_states: tuple[Tensor, ...] | None  # the target's hidden states over the prompt, each [1, n, H]
    input_embeds: Tensor | None = None  # [n, H] the language model's input embeddings (image tokens = projector out)
    n_images: int = 0


@dataclass
class Pairs:
    """Pairs (feature f_j, token t_{j+1}) confirmed by the target and not yet read by the drafter."""

    features: Tensor  # [m, H] fused
    tokens: Tensor  # [m]
    positions: Tensor  # [m]
    embeds: Tensor | None = None  # [m, H] replaces token embeddings (ViSpec image slots)
    image_vec: Tensor | None = None  # [m, H] or [1, H] global image vector in force


def build_pairs(
    drafter: Drafter, tokens: Tensor, positions: Tensor, feats: Tensor, input_embeds: Tensor | None, n_images: int = 0
) -> tuple[Pairs, Tensor, Tensor | None]:
    """Tokens t_0..t_n with fused features f_0..f_{n-1} -> the drafter's pairs (f_{i-1}, t_i), image tokens compressed
    when the drafter has a vision adaptor (input_embeds [>= n, H] then gives each image's target embeddings).

    tokens, positions: [n + 1];  feats: [n, H].  Returns the pairs, the token index i of each pair [m], and the global
    vector of the last image [1, H] (in force for everything after the prompt), or None.
    """
    dev = tokens.device
    if drafter.vision is None:
        keep = torch.arange(1, tokens.numel(), device=dev)
        embeds = None
        if drafter.config.modality == "image":  # text prompt, then codes: each through the target's own embedding
            m = input_embeds.shape[0]  # the embeddings the target saw; later tokens are codes it has not embedded yet
            embeds = torch.cat([input_embeds[1:m].to(feats.dtype), drafter.embed_tokens(tokens[m:]).to(feats.dtype)])
        return Pairs(feats, tokens[1:], positions[1:], embeds), keep, None
    plan = plan_compression(tokens, drafter.config.image_token_id, drafter.vision.num_queries, n_images)
    keep = plan.keep.to(dev)
    kept_tokens = tokens[keep]
    embeds = drafter.embed_tokens(kept_tokens).to(feats.dtype)
    vec = feats.new_zeros(keep.numel(), feats.shape[-1])
    last_vec = None
    if plan.spans:
        out = drafter.vision([input_embeds[s:e] for s, e in plan.spans])  # [I, nq, H]
        slots, globals_ = out[:, :-1].flatten(0, 1).to(feats.dtype), out[:, -1].to(feats.dtype)
        is_slot, has_img = (plan.slot >= 0).to(dev), (plan.image_of >= 0).to(dev)
        # index_put keeps the graph: the adaptor is trained through these slots and vectors
        embeds = embeds.index_put((is_slot.nonzero().flatten(),), slots[plan.slot.to(dev)[is_slot]])
        vec = vec.index_put((has_img.nonzero().flatten(),), globals_[plan.image_of.to(dev)[has_img]])
        last_vec = globals_[-1:]
    return Pairs(feats[keep - 1], kept_tokens, positions[keep], embeds, vec), keep, last_vec


def prompt_pairs(drafter: Drafter, prompt: PromptContext, first_token: int, first_pos: int) -> tuple[Pairs, Tensor | None]:
    """The prompt plus the first generated token as drafter pairs; see build_pairs."""
    dev = prompt.input_ids.device
    feats = drafter.fuse([h[0] for h in prompt.hidden_states])  # [n, H]: f_0 .. f_{n-1}
    tokens = torch.cat([prompt.input_ids, torch.tensor([first_token], device=dev)])
    positions = torch.cat([prompt.positions.to(dev), torch.tensor([first_pos], device=dev)])
    pairs, _, last_vec = build_pairs(drafter, tokens, positions, feats, prompt.input_embeds, prompt.n_images)
    return pairs, last_vec


class NullProposer:
    needs_features = False
    forwards = 0  # drafter forwards run so far

    def start(self, prompt: PromptContext, first_token: int, first_pos: int) -> None:
        pass

    def propose(self, root: Tensor, root_pos: int) -> DraftTree:
        return DraftTree.from_parents(root.reshape(1), [-1])

    def commit(self, tree: DraftTree, acceptance: Acceptance, hidden_states: tuple[Tensor, ...] | None,
               scores: Tensor | None = None) -> None:
        pass


class EagleProposer:
    """EAGLE-2 dynamic tree from a one-layer drafter (Li et al. 2024): beam over cumulative draft log-probability, then
    rerank every candidate and keep the best `total_tokens - 1` as a connected subtree.

    With `combine` (e.g. engine.guidance(s)) the drafter reads the first B rows of the target (a CFG generator's cond
    and uncond rows), runs on each with its own KV, and the tree grows from the rows' draft logits combined as the
    target's are (LANTERN drafts this way); without it, it reads row 0 alone."""

    needs_features = True
    prune = True  # stop drafting once no deeper candidate can enter the tree (same tree, fewer forwards)

    def __init__(self, drafter: Drafter, tree: TreeConfig, combine=None, rows: int = 2,
                 sampling: SamplingConfig | None = None, generator: torch.Generator | None = None) -> None:
        self.drafter = drafter
        self.tree = tree
        # Given a sampling warp above temperature 0, a chain (top_k 1) draws each draft from the drafter's warped
        # distribution q and carries q to verification, which accepts it with min(1, p / q): it passes with
        # sum min(p, q), where the argmax draft passes with p(argmax), little on a flat target such as image codes.
        self.sampling = sampling if sampling is not None and not sampling.greedy and tree.top_k == 1 else None
        self.generator = generator
        if self.sampling is not None and getattr(drafter, "d2t", None) is not None:
            raise InputError("sampled chains need a drafter whose head covers the target's vocabulary (this one has "
                             "a reduced draft vocabulary); use top_k >= 2 or temperature 0")
        self.beam_logp: list[Tensor] = []  # per depth of the last grow, each beam row's draft log-probs [k, V]
        self.rows = 1 if combine is None else rows
        self._combine = combine or (lambda logits: logits[0])  # [B, ..., V] -> [..., V]
        self.forwards = 0  # drafter forwards run so far, counted where they run
        self.kv = DraftKV()
        # a reduced draft vocabulary's ids -> the target's; a drafter without one (or a stand-in) keeps its ids
        self._to_target = getattr(drafter, "target_ids", lambda ids: ids)
        self._pending: Pairs | None = None  # every field with a leading row dimension
        self._image_vec: Tensor | None = None  # [1, H] the last image's global vector, in force after the prompt
        self._root_pos = 0

    @property
    def needs_embeds(self) -> bool:
        """The drafter reads the prompt's input embeddings: image slots (ViSpec) or a text prompt before image codes."""
        return self.drafter.vision is not None or self.drafter.config.modality == "image"

    def start(self, prompts: PromptContext | list[PromptContext], first_token: int, first_pos: int) -> None:
        """prompts: one context per drafter row (the engine gives `self.rows` of them)."""
        self.kv = DraftKV()
        rows = [prompt_pairs(self.drafter, p, first_token, first_pos) for p in
                (prompts if isinstance(prompts, list) else [prompts])]
        self._image_vec = rows[0][1]

        def stack(name):
            parts = [getattr(pairs, name) for pairs, _ in rows]
            return None if parts[0] is None else torch.stack(parts)

        self._pending = Pairs(*(stack(n) for n in ("features", "tokens", "positions", "embeds", "image_vec")))

    def commit(self, tree: DraftTree, acceptance: Acceptance, hidden_states: tuple[Tensor, ...] | None,
               scores: Tensor | None = None) -> None:
        dev = tree.tokens.device
        path = acceptance.path.to(dev)
        feats = self.drafter.fuse([h[: self.rows, path] for h in hidden_states])  # [B, n + 1, H]
        tokens = torch.tensor(acceptance.tokens, device=dev).expand(self.rows, -1)
        positions = torch.arange(self._root_pos + 1, self._root_pos + 1 + tokens.shape[1], device=dev)
        vec = None if self._image_vec is None else self._image_vec[None]
        self._pending = Pairs(feats, tokens, positions.expand(self.rows, -1), image_vec=vec)

    @torch.no_grad()
    def propose(self, root: Tensor, root_pos: int) -> DraftTree:
        if self.sampling is not None:
            tokens, q = self.sample_chain(root_pos)
            q = torch.cat([q.new_zeros(1, q.shape[-1]), q])  # row 0: the root, committed, not drafted
            return DraftTree.chain(torch.cat([root.reshape(1), tokens]), draft_probs=q)
        tokens, parents, scores = self.grow(root_pos)
        return select_tree(root.reshape(1), tokens, parents, scores, self.tree.total_tokens)

    def _catch_up(self, root_pos: int) -> Tensor:
        """Run the drafter over the newly committed pairs (the last one ends in the root and predicts depth 1) and
        keep them in its KV; -> their predicted features [B, m, H]."""
        d, pend = self.drafter, self._pending
        self._root_pos = root_pos
        tokens = pend.tokens  # [B, m]
        m, past = tokens.shape[1], self.kv.length
        mask = torch.ones(m, past + m, dtype=torch.bool, device=tokens.device)
        mask[:, past:] = torch.ones(m, m, dtype=torch.bool, device=tokens.device).tril()
        feats = pend.features.to(d.q_proj.weight.dtype)
        hidden = d(tokens, feats, pend.positions, mask[None], self.kv, pend.embeds, pend.image_vec)
        self.forwards += 1
        return hidden

    @torch.no_grad()
    def sample_chain(self, root_pos: int) -> tuple[Tensor, Tensor]:
        """min(depth, total_tokens - 1) drafts, each drawn from the drafter's warped distribution given the drafts
        before it -> (tokens [n], the distributions q they were drawn from [n, V])."""
        d = self.drafter
        feat = self._catch_up(root_pos)[:, -1:]  # [B, 1, H]
        committed, b, dev = self.kv.length, feat.shape[0], feat.device
        vec = None if self._image_vec is None else self._image_vec[None]
        tokens, qs = [], []
        for depth in range(min(self.tree.depth, self.tree.total_tokens - 1)):
            if depth:  # the last draft, fed with the feature that predicted it, at its own position
                pos = torch.full((b, 1), root_pos + depth, device=dev)
                mask = torch.ones(1, 1, committed + depth, dtype=torch.bool, device=dev)
                feat = d(tokens[-1].expand(b, 1), feat, pos, mask, self.kv, image_vec=vec)
                self.forwards += 1
            q = warp(self._combine(d.logits(feat[:, -1]).float()), self.sampling)  # [V]
            tokens.append(torch.multinomial(q, 1, generator=self.generator))
            qs.append(q)
        self.kv.crop(committed)
        return torch.cat(tokens), torch.stack(qs)

    @torch.no_grad()
    def grow(self, root_pos: int) -> tuple[Tensor, Tensor, Tensor]:
        """Catch up on the committed pairs, then grow the beam: every candidate as (tokens, parents, cumulative
        log-probabilities) [N], in generation order (top_k at depth 1, then top_k**2 per depth)."""
        d, cfg = self.drafter, self.tree
        hidden = self._catch_up(root_pos)  # [B, m, H]
        dev, k, b = hidden.device, cfg.top_k, hidden.shape[0]
        vec = None if self._image_vec is None else self._image_vec[None]  # [1, 1, H]
        committed = self.kv.length
        logp = torch.log_softmax(self._combine(d.logits(hidden[:, -1]).float()), dim=-1)  # [V]
        self.beam_logp = [logp[None]]
        scores, beam_tokens = logp.topk(k)  # [k]
        beam_tokens = self._to_target(beam_tokens)
        cand_tokens, cand_parents, cand_scores = [beam_tokens], [torch.full((k,), -1, device=dev)], [scores]
        beam_feats = hidden[:, -1:].expand(b, k, -1)  # fed with each beam token: its parent's predicted feature
        beam_index = torch.arange(k, device=dev)  # each beam node's index among the candidates
        # One mask for the whole draft: committed columns all True, then each depth's k beam slots; a beam row sees
        # the slots of its own ancestors (copied from its parent's row) and itself.
        mask = torch.ones(k, committed + (cfg.depth - 1) * k, dtype=torch.bool, device=dev)
        eye = torch.eye(k, dtype=torch.bool, device=dev)
        mask[:, committed : committed + k] = eye[:, : mask.shape[1] - committed]  # nothing to write at depth 1
        n_cand = k
        for depth in range(1, cfg.depth):
            if self._stop_drafting(cand_scores, scores, cfg.total_tokens - 1):
                break
            end = committed + depth * k
            pos = torch.full((b, k), root_pos + depth, device=dev)
            hidden = d(beam_tokens.expand(b, k), beam_feats, pos, mask[None, :, :end], self.kv, image_vec=vec)
            self.forwards += 1
            logp = torch.log_softmax(self._combine(d.logits(hidden).float()), dim=-1)  # [k, V]
            self.beam_logp.append(logp)
            top_lp, top_tok = logp.topk(k, dim=-1)  # [k, k]
            top_tok = self._to_target(top_tok)
            cum = (scores[:, None] + top_lp).flatten()
            cand_tokens.append(top_tok.flatten())
            cand_parents.append(beam_index.repeat_interleave(k))
            cand_scores.append(cum)
            scores, best = cum.topk(k)
            parent_row = best // k
            beam_tokens = top_tok.flatten()[best]
            beam_feats = hidden[:, parent_row]
            beam_index = n_cand + best
            if depth + 1 < cfg.depth:
                mask[:, committed:end] = mask[parent_row, committed:end]
                mask[:, end : end + k] = eye
            n_cand += k * k
        self.kv.crop(committed)
        return torch.cat(cand_tokens), torch.cat(cand_parents), torch.cat(cand_scores)

    def _stop_drafting(self, cand_scores: list[Tensor], beam_scores: Tensor, n_keep: int) -> bool:
        """Whether to stop before the next depth. Below the tree's min_confidence the best path is unlikely to be
        accepted further (a choice of shape). Otherwise only when no deeper candidate can make the final tree, so the
        tree is the same: a child scores at most its parent (log-probabilities are <= 0) and ties go to earlier
        candidates, so once the best beam score is at most the n_keep-th best so far, every later candidate loses."""
        floor = self.tree.min_confidence
        if floor > 0 and float(beam_scores.max()) < math.log(floor):
            return True
        if not self.prune or sum(c.numel() for c in cand_scores) < n_keep:
            return False
        kth = torch.cat(cand_scores).topk(n_keep).values[-1]
        return bool(beam_scores.max() <= kth)
