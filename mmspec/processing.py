"""The target's generation_config, honoured as transformers' generate honours it, on every node of a draft tree.

Qwen2-VL instruct checkpoints, for one, ship `repetition_penalty=1.05`; `target.generate(**inputs, do_sample=False)`
applies it, so a lossless speculative decoder must too. The processors are transformers' own, built by the model's own
`_get_logits_processor` (same classes, same order as generate). Each tree node's logits are processed with that node's
own history: prompt + committed tokens + its root-to-node path, so a penalty sees exactly what generate would have seen
had it reached that node. Settings that select another decoding algorithm cannot be applied per node and are refused at
load. The sampling knobs (do_sample, temperature, top_k, top_p, min_p, typical_p, epsilon/eta cutoffs) are not read:
mmspec's explicit `temperature` / `top_k` / `top_p` arguments decide the warp.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn
from transformers import GenerationConfig

from .errors import InputError
from .tree import DraftTree

# generation_config fields that switch generate to another algorithm, or add a processor that is not a function of
# the node's history, with why mmspec cannot reproduce them per node.
REFUSED = {
    "num_beams": "beam search",
    "num_beam_groups": "group beam search",
    "diversity_penalty": "group beam search",
    "penalty_alpha": "contrastive search",
    "dola_layers": "DoLa decoding",
    "num_return_sequences": "several sequences per prompt",
    "guidance_scale": "text classifier-free guidance through an extra model forward",
    "watermarking_config": "a watermark applied after the sampling warp",
    "stop_strings": "stopping on decoded strings",
    "prompt_lookup_num_tokens": "another speculative decoder",
    "assistant_early_exit": "another speculative decoder",
}
SAMPLING_KNOBS = ("do_sample", "temperature", "top_k", "top_p", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff",
                  "top_h")


def refused_settings(config: GenerationConfig) -> list[str]:
    """`name=value (why)` for each setting in `config` that mmspec cannot apply exactly; empty when all is well."""
    default = GenerationConfig()
    out = []
    for name, why in REFUSED.items():
        value, base = getattr(config, name, None), getattr(default, name, None)
        if value != base and not (name == "guidance_scale" and value == 1):
            out.append(f"{name}={value!r} ({why})")
    return out


def check_generation_config(config: GenerationConfig | None) -> GenerationConfig:
    config = copy.deepcopy(config) if config is not None else GenerationConfig()
    if not isinstance(config, GenerationConfig):
        raise InputError(f"generation_config must be a transformers.GenerationConfig, got {type(config).__name__}")
    refused = refused_settings(config)
    if refused:
        raise InputError(
            f"the target's generation_config sets {'; '.join(refused)}, which mmspec cannot apply to every draft-tree "
            f"node exactly; pass mmspec.load(..., generation_config=GenerationConfig(...)) without it"
        )
    return config


class NodeProcessor:
    """generation_config's logits processors for one generation, applied to the nodes of each verified tree."""

    def __init__(self, model: nn.Module, config: GenerationConfig, prompt_len: int, max_new_tokens: int,
                 device: torch.device) -> None:
        cfg = copy.deepcopy(config)
        cfg.do_sample = False  # the warpers are mmspec's own (SamplingConfig), applied after these processors
        cfg.max_length = prompt_len + max_new_tokens  # as generate sets it from max_new_tokens (ForcedEOS reads it)
        model._prepare_special_tokens(cfg, kwargs_has_attention_mask=True, device=device)
        self.processors = model._get_logits_processor(cfg, input_ids_seq_length=prompt_len, device=device,
                                                      model_kwargs={})

    def __bool__(self) -> bool:
        return len(self.processors) > 0

    def __call__(self, tree: DraftTree, logits: Tensor, history: Tensor) -> Tensor:
        """logits [T, V] of the tree's nodes; history [L] long, the tokens before the root (prompt + committed).
        Returns the processed [T, V] float32 scores; node i is processed with history + root..i."""
        scores = logits.float()  # generate runs its processors on float32 logits
        out = torch.empty_like(scores)
        for depth in range(tree.max_depth + 1):
            nodes = (tree.depths == depth).nonzero().flatten().to(scores.device)
            path = tree.tokens[None].expand(nodes.numel(), -1)[tree.mask[nodes]].view(nodes.numel(), depth + 1)
            ids = torch.cat([history[None].expand(nodes.numel(), -1), path], dim=1)
            out[nodes] = self.processors(ids, scores[nodes])
        return out
