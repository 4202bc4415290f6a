"""The drafter's training objective (EAGLE-3 with the ViSpec adaptor; see mmspec.train for the method): soft
cross-entropy against the target at every assistant position through a training-time-test unroll, and the held-out
evaluation that reads the same forward."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .draft_vocab import restrict_teacher
from .drafter import Drafter
from .proposer import build_pairs
from .train_examples import Example

DEPTH_WEIGHT = 0.8  # the loss of unroll step s weighs DEPTH_WEIGHT**s (EAGLE-3)


class DraftObjective(nn.Module):
    """Wraps the drafter so that one forward computes the whole unrolled loss (what DDP needs to sync gradients)."""

    def __init__(self, drafter: Drafter, ttt_steps: int, noise: float) -> None:
        super().__init__()
        self.drafter = drafter
        self.ttt_steps = ttt_steps
        self.noise = noise

    def _pairs(self, ex: Example, generator: torch.Generator | None):
        d = self.drafter
        fused = d.fuse_selected(ex.features)  # [n, H]
        feats = fused[:-1]
        if self.training and self.noise > 0:
            rms = feats.detach().pow(2).mean(-1, keepdim=True).sqrt()
            feats = feats + torch.randn(feats.shape, generator=generator, device=feats.device, dtype=feats.dtype) * rms * self.noise
        pairs, keep, _ = build_pairs(d, ex.tokens, ex.positions, feats, ex.input_embeds, ex.n_images)
        n = ex.tokens.numel()
        label_ok = torch.zeros_like(keep, dtype=torch.bool)
        inside = keep + 1 < n
        label_ok[inside] = ex.assistant[keep[inside] + 1]
        teacher = ex.teacher_logits[keep]
        return pairs, teacher, label_ok, fused[keep].detach()

    def unroll(self, tokens: Tensor, positions: Tensor, feats: Tensor, embeds: Tensor | None, vec: Tensor | None) -> list[Tensor]:
        """The training-time-test unroll over padded pairs [B, m]; returns the predicted features of every step [B, m, H].

        Query j at step s attends to the real prefix (step-0 keys of slots <= j - s) and to its own chain (the step-t
        key of slot j - s + t for t = 1..s): what a node at draft depth s + 1 sees in the proposer's KV cache."""
        d = self.drafter
        m, dev = tokens.shape[1], tokens.device
        causal = torch.ones(m, m, dtype=torch.bool, device=dev).tril()
        eye = torch.eye(m, dtype=torch.bool, device=dev)
        rows = torch.arange(m, device=dev)[:, None]
        keys, values, outs = [], [], []
        step_feats = feats
        for s in range(self.ttt_steps):
            x, residual = d.inputs(tokens, step_feats, embeds, vec)
            q, k, v = d.qkv(x, positions)
            keys.append(k)
            values.append(v)
            real = causal.roll(s, dims=0) & (rows >= s)  # key i <= j - s; rows j < s have no real prefix
            chain = [eye.roll(-(s - t), dims=1) & (rows >= s) for t in range(1, s + 1)]
            mask = torch.cat([real, *chain], dim=1)
            mask[:, -m:] |= eye  # every query sees itself, so no row is empty (rows j < s carry no loss)
            out = d.finish(residual, d.attend(q, torch.cat(keys, 2), torch.cat(values, 2), mask[None]))
            outs.append(out)
            # the next step's pair at slot j reads this step's prediction for slot j - 1
            step_feats = torch.cat([torch.zeros_like(out[:, :1]), out[:, :-1]], dim=1)
        return outs

    def forward(self, examples: list[Example], generator: torch.Generator | None = None) -> tuple[Tensor, dict]:
        d = self.drafter
        built = [self._pairs(ex, generator) for ex in examples]
        b, m = len(built), max(p.tokens.numel() for p, *_ in built)
        h = d.config.hidden_size
        dev = built[0][0].tokens.device
        dtype = d.q_proj.weight.dtype

        def pad(get, fill, shape=()):
            out = torch.full((b, m, *shape), fill, device=dev, dtype=get(0).dtype)
            for i in range(b):
                x = get(i)
                out[i, : x.shape[0]] = x
            return out

        tokens = pad(lambda i: built[i][0].tokens, 0)
        positions = pad(lambda i: built[i][0].positions, 0)
        feats = pad(lambda i: built[i][0].features.to(dtype), 0.0, (h,))
        has_embeds = built[0][0].embeds is not None  # image slots (ViSpec) or an image drafter's text prompt
        embeds = pad(lambda i: built[i][0].embeds.to(dtype), 0.0, (h,)) if has_embeds else None
        vec = None if d.vision is None else pad(lambda i: built[i][0].image_vec.to(dtype), 0.0, (h,))
        teacher = pad(lambda i: built[i][1].float(), 0.0, (built[0][1].shape[-1],))
        label_ok = pad(lambda i: built[i][2], False)
        if d.draft_token_ids is not None:  # a reduced head learns the target's distribution over its vocabulary
            teacher, label_ok = restrict_teacher(teacher, d.draft_token_ids, label_ok)
        reg_target = pad(lambda i: built[i][3].to(dtype), 0.0, (h,)) if d.config.fusion == "last" else None

        teacher_lp = torch.log_softmax(teacher, dim=-1)
        teacher_top = teacher.argmax(-1)
        total, weights, metrics = 0.0, 0.0, {}
        for s, out in enumerate(self.unroll(tokens, positions, feats, embeds, vec)):
            valid = label_ok.clone()
            valid[:, :s] = False
            logp = torch.log_softmax(d.logits(out).float(), dim=-1)
            ce = -(teacher_lp.exp() * logp).sum(-1)
            n_valid = valid.sum().clamp(min=1)
            loss = (ce * valid).sum() / n_valid
            if reg_target is not None:
                reg = F.smooth_l1_loss(out.float(), reg_target.float(), reduction="none").mean(-1)
                loss = loss + (reg * valid).sum() / n_valid
            w = DEPTH_WEIGHT**s
            total = total + w * loss
            weights += w
            metrics[f"loss_{s}"] = loss.detach()
            metrics[f"acc_{s}"] = ((logp.argmax(-1) == teacher_top) & valid).sum().float() / n_valid
            metrics[f"n_{s}"] = valid.sum()
            if not self.training:  # evaluation only: a [B, m, V] pass more, kept out of the training step's graph
                # sum_x min(p, q): how often one draft sampled from the drafter passes speculative sampling at T = 1
                overlap = torch.minimum(teacher_lp.exp(), logp.exp()).sum(-1)
                metrics[f"accept_{s}"] = (overlap * valid).sum() / n_valid
        return total / weights, metrics


@torch.no_grad()
def evaluate(objective: DraftObjective, batches: list[list[Example]]) -> dict:
    """Held-out loss, per-depth top-1 agreement with the target (the greedy acceptance rate at each draft depth) and
    per-depth overlap sum min(p, q) (the acceptance rate of a draft sampled from the drafter at temperature 1)."""
    objective.eval()
    sums: dict[str, float] = {}
    for exs in batches:
        _, m = objective(exs)
        for s in range(objective.ttt_steps):
            n = float(m[f"n_{s}"])
            for key in ("acc", "accept"):
                sums[f"{key}_{s}"] = sums.get(f"{key}_{s}", 0.0) + float(m[f"{key}_{s}"]) * n
            sums[f"loss_{s}"] = sums.get(f"loss_{s}", 0.0) + float(m[f"loss_{s}"]) * n
            sums[f"n_{s}"] = sums.get(f"n_{s}", 0.0) + n
    objective.train()
    out = {}
    for s in range(objective.ttt_steps):
        n = max(sums.get(f"n_{s}", 0.0), 1.0)
        out[f"depth{s + 1}_acc"] = sums.get(f"acc_{s}", 0.0) / n
        out[f"depth{s + 1}_accept_t1"] = sums.get(f"accept_{s}", 0.0) / n
        out[f"depth{s + 1}_loss"] = sums.get(f"loss_{s}", 0.0) / n
    return out
