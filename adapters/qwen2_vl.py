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

    @staticmethod
    def has_vision(inputs: dict) -> bool:
        return inputs.get("image_grid_thw") is not None or inputs.get("video_grid_thw") is not None

    def row_positions(self, model: nn.Module, inputs: dict) -> tuple[Tensor, Tensor]:
        ids = inputs["input_ids"]
        if not self.has_vision(inputs):
            return super().row_positions(model, inputs)
        core = model.model
        params = inspect.signature(core.get_rope_index).parameters
        kwargs = {k: v for k, v in inputs.items() if k in params and k != "input_ids"}
        pos3, _ = core.get_rope_index(ids, **kwargs)  # [3, B, n]; left padding is read from attention_mask
        pos = pos3.max(dim=0).values.to(ids.device)  # [B, n]
        return pos, (pos.max(dim=-1).values + 1).cpu()

    def prefill_position_ids(self, inputs: dict, positions: Tensor) -> Tensor | None:
        # With images the model's own get_rope_index reads the padding from attention_mask (as row_positions does);
        # without, it would number a padded row from its first pad, so the positions are passed.
        return None if self.has_vision(inputs) else self.position_ids(positions)

    def position_ids(self, positions: Tensor) -> Tensor:
        return positions[None].expand(3, -1, -1)
