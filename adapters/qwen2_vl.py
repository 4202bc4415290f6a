"""Qwen2-VL and Qwen2.5-VL: multimodal RoPE (M-RoPE).

Image tokens get (temporal, height, width) positions, so text after an image sits at `index + rope_delta` with a
negative delta. The tree's tokens are text: all three rows carry the same value, offset by the prompt's delta, exactly as
transformers computes them during generate. The drafter's 1-D position for a prompt token is the largest of its three
rows, which equals the text position for text and keeps the text after an image at the target's own positions.
"""

from __future__ import annotations

import inspect

from torch import Tensor, nn

from .base import Adapter


class Qwen2VLAdapter(Adapter):
    name = "qwen2_vl"
    model_types = ("qwen2_vl", "qwen2_5_vl")

    def prompt_positions(self, model: nn.Module, inputs: dict) -> tuple[Tensor, int]:
        ids = inputs["input_ids"]
        has_vision = inputs.get("image_grid_thw") is not None or inputs.get("video_grid_thw") is not None
        if not has_vision:
            return super().prompt_positions(model, inputs)
        core = model.model
        params = inspect.signature(core.get_rope_index).parameters
        kwargs = {k: v for k, v in inputs.items() if k in params and k != "input_ids"}
        pos3, _ = core.get_rope_index(ids, **kwargs)  # [3, 1, n]
        pos = pos3[:, 0].max(dim=0).values.to(ids.device)
        return pos, int(pos[-1]) + 1

    def position_ids(self, positions: Tensor) -> Tensor:
        return positions.view(1, 1, -1).expand(3, 1, -1)
