"""Proposers: what grows the draft tree each step. The generation loop talks to one through three calls:

    start(prompt)                        after the target's prefill: prompt tokens, their target features and positions
    propose(root, root_pos) -> DraftTree  the tree to verify next, hanging from the last committed token
    commit(tree, acceptance, features)   the accepted path's target features, so the drafter can catch up

`NullProposer` proposes the root alone, which makes the loop plain autoregressive decoding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .config import TreeConfig
from .drafter import DraftKV, Drafter
from .tree import DraftTree, select_tree
from .verify import Acceptance


@dataclass
class PromptContext:
    input_ids: Tensor  # [n] long, the prompt as the target saw it
    positions: Tensor  # [n] long, 1-D target positions of the prompt tokens (the temporal/max row for M-RoPE)
    hidden_states: tuple[Tensor, ...] | None  # the target's hidden states over the prompt, each [1, n, H]


class NullProposer:
    needs_features = False
    forwards_per_step = 0

    def start(self, prompt: PromptContext, first_token: int, first_pos: int) -> None:
        pass

    def propose(self, root: Tensor, root_pos: int) -> DraftTree:
        return DraftTree.from_parents(root.reshape(1), [-1])

    def commit(self, tree: DraftTree, acceptance: Acceptance, hidden_states: tuple[Tensor, ...] | None) -> None:
        pass


class EagleProposer:
    """EAGLE-2 dynamic tree from a one-layer drafter (Li et al. 2024): beam over cumulative draft log-probability, then
    rerank every candidate and keep the best `total_tokens - 1` as a connected subtree."""

    needs_features = True

    def __init__(self, drafter: Drafter, tree: TreeConfig) -> None:
        self.drafter = drafter
        self.tree = tree
        self.forwards_per_step = tree.depth
        self.kv = DraftKV()
        # Pairs (feature f_j, token t_{j+1}) the target has confirmed but the drafter has not yet read.
        self._pending: tuple[Tensor, Tensor, Tensor] | None = None

    def start(self, prompt: PromptContext, first_token: int, first_pos: int) -> None:
        self.kv = DraftKV()
        dev = prompt.input_ids.device
        feats = self.drafter.fuse([h[0] for h in prompt.hidden_states])  # [n, H]
        tokens = torch.cat([prompt.input_ids[1:], torch.tensor([first_token], device=dev)])
        positions = torch.cat([prompt.positions[1:], torch.tensor([first_pos], device=dev)])
        self._pending = (feats, tokens, positions)

    def commit(self, tree: DraftTree, acceptance: Acceptance, hidden_states: tuple[Tensor, ...] | None) -> None:
        path = acceptance.path.to(tree.tokens.device)
        feats = self.drafter.fuse([h[0, path] for h in hidden_states])  # [n + 1, H]
        tokens = torch.tensor(acceptance.tokens, device=tree.tokens.device)
        root_pos = int(self._root_pos)
        positions = torch.arange(root_pos + 1, root_pos + 1 + len(acceptance.tokens), device=tree.tokens.device)
        self._pending = (feats, tokens, positions)

    @torch.no_grad()
    def propose(self, root: Tensor, root_pos: int) -> DraftTree:
        d, cfg = self.drafter, self.tree
        self._root_pos = root_pos
        feats, tokens, positions = self._pending
        dev, k = tokens.device, cfg.top_k
        past = self.kv.length
        m = tokens.numel()
        # Catch up on the newly committed pairs; the last one (ending in the root) predicts depth 1.
        mask = torch.ones(m, past + m, dtype=torch.bool, device=dev)
        mask[:, past:] = torch.ones(m, m, dtype=torch.bool, device=dev).tril()
        hidden = d(tokens[None], feats[None].to(d.q_proj.weight.dtype), positions[None], mask[None], self.kv)[0]
        committed = self.kv.length
        logp = torch.log_softmax(d.logits(hidden[-1]).float(), dim=-1)
        scores, beam_tokens = logp.topk(k)  # [k]
        cand_tokens, cand_parents, cand_scores = [beam_tokens], [torch.full((k,), -1, device=dev)], [scores]
        beam_feats = hidden[-1].expand(k, -1)  # features fed with each beam token: its parent's predicted feature
        beam_index = torch.arange(k, device=dev)  # each beam node's index among the candidates
        anc = torch.eye(k, dtype=torch.bool, device=dev)  # beam rows x drafter-cache slots appended this step
        n_cand = k
        for depth in range(1, cfg.depth):
            pos = torch.full((1, k), root_pos + depth, device=dev)
            mask = torch.cat([torch.ones(k, committed, dtype=torch.bool, device=dev), anc], dim=1)
            hidden = d(beam_tokens[None], beam_feats[None], pos, mask[None], self.kv)[0]  # [k, H]
            logp = torch.log_softmax(d.logits(hidden).float(), dim=-1)
            top_lp, top_tok = logp.topk(k, dim=-1)  # [k, k]
            cum = (scores[:, None] + top_lp).flatten()
            cand_tokens.append(top_tok.flatten())
            cand_parents.append(beam_index.repeat_interleave(k))
            cand_scores.append(cum)
            scores, best = cum.topk(k)
            parent_row = best // k
            beam_tokens = top_tok.flatten()[best]
            beam_feats = hidden[parent_row]
            beam_index = n_cand + best
            anc = torch.cat([anc[parent_row], torch.eye(k, dtype=torch.bool, device=dev)], dim=1)
            n_cand += k * k
        self.kv.crop(committed)
        return select_tree(
            root.reshape(1), torch.cat(cand_tokens), torch.cat(cand_parents), torch.cat(cand_scores), cfg.total_tokens
        )
