"""Teacher signals for an image-code drafter (Janus family): self-distillation, on the fly, as for VLM drafters.

Data: one prompt per JSONL line, `{"prompt": "two small red circles at the top left"}`. For each line the frozen target
draws its own image as at inference (classifier-free guidance, temperature 1), by mmspec's lossless Jacobi decoding:
the codes follow the distribution of the target's own `generate` but take ~3x fewer target forwards, which is most of
a drafter build's time on a CPU (500 prompts of a 12-block target: 36 min by `generate`). Then one
forward of both rows over prompt + codes gives what the drafter learns from: the cond row's hidden states (what it reads
at inference) and the guided logits uncond + s * (cond - uncond) (what the acceptance rule tests its drafts against).
Drafting from the cond row alone keeps the drafter's cost at one row; its target is already the guided distribution.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from .config import TreeConfig
from .errors import InputError
from .image_pipeline import ImagePipeline
from .train_examples import Example


@dataclass(frozen=True)
class PromptLine:
    line_no: int  # 1-based line in the source file (the teacher cache keys on it)
    prompt: str
    images: tuple = ()  # none: keeps the VLM path's image checks quiet


def read_prompts(path) -> list[PromptLine]:
    """`{"prompt": "..."}` per line -> PromptLines; a malformed line is an error naming the file and line."""
    from .data_tools.jsonl import iter_lines

    out = []
    for line_no, text in iter_lines(path):
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}:{line_no}: not valid JSON ({e.msg})") from None
        prompt = obj.get("prompt") if isinstance(obj, dict) else None
        if not isinstance(prompt, str) or not prompt.strip():
            raise InputError(f'{path}:{line_no}: an image target trains on lines {{"prompt": "..."}} with a non-empty '
                             f"prompt string")
        out.append(PromptLine(line_no, prompt))
    return out


@torch.no_grad()
def teach_image(drawer, line: PromptLine, feature_layers: tuple[int, ...], scale: float, seed: int, rows: int = 1):
    """-> Examples over prompt + the target's own codes for this line (codes are the learned tokens): rows=1,
    one for the cond row with the guided logits as teacher; rows=2, one per row with that row's own logits.
    drawer: a draft-free ImagePipeline over the frozen target (`drawer_for`)."""
    model, adapter, processor = drawer.target, drawer.adapter, drawer.processor
    inputs = adapter.prepare(processor, line.prompt, []).to(model.device)
    gc = model.generation_config
    bos, boi, pad = int(gc.bos_token_id), adapter.boi_token_id(processor), int(gc.pad_token_id)
    codes = torch.tensor(drawer.generate_image(
        line.prompt, guidance_scale=scale, temperature=1.0, seed=seed * 1_000_003 + line.line_no, draft="jacobi",
    ).token_ids, device=model.device)
    ids = adapter.guidance_rows(inputs, bos, boi, pad)["input_ids"]  # [2, n]: cond, uncond
    embed_codes = adapter.code_embedding(model)(codes)
    embeds = torch.cat([adapter.embed_prompt(model, ids), embed_codes[None].expand(2, -1, -1)], dim=1)
    out = adapter.decoder(model)(inputs_embeds=embeds, output_hidden_states=True, use_cache=False)
    logits = adapter.code_head(model)(out.last_hidden_state)  # [2, m, V]
    teachers = [logits[1] + scale * (logits[0] - logits[1])] if rows == 1 else [logits[0], logits[1]]
    n = ids.shape[1]
    out_rows = []
    for r, teacher in enumerate(teachers):
        tokens = torch.cat([ids[r], codes])  # the drafter's token stream: prompt, then codes
        learned = torch.zeros(tokens.numel(), dtype=torch.bool, device=tokens.device)
        learned[n:] = True  # pair i predicts token i + 1: the codes after BOI
        out_rows.append(Example(
            tokens=tokens,
            positions=torch.arange(tokens.numel(), device=tokens.device),
            features=[out.hidden_states[i][r] for i in feature_layers],
            input_embeds=embeds[r],
            teacher_logits=teacher,
            assistant=learned,
        ))
    return out_rows


def drawer_for(model, adapter, processor):
    """The draft-free ImagePipeline that draws the teacher images (it keeps no state between images)."""
    return ImagePipeline(model, processor, adapter, None, TreeConfig.preset("chain"))
