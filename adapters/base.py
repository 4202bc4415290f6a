"""What the engine needs to know about a target family, and nothing else.

An adapter answers four questions: which transformers auto class loads it, how a prompt and images become the target's
inputs (its own processor and chat template), where each prompt token sits in position space (1-D, or M-RoPE with a
text offset), and how to pass position ids for the tokens of a tree. Embeddings, LM head and hidden states come from the
standard transformers accessors, so most families need only a few lines.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor, nn
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, BatchFeature

from mmspec.errors import InputError


def image_chat(messages: Sequence[dict], n_images: int) -> list[dict]:
    """The one chat layout for images: every content a part list, the images as `{"type": "image"}` parts opening the
    first user turn, in order, before its text (what the LLaVA and Qwen-VL templates expect). Contents that are already
    part lists are kept as they are."""
    out = []
    for m in messages:
        content = m["content"]
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else list(content)
        if m["role"] == "user" and n_images:
            parts, n_images = [{"type": "image"} for _ in range(n_images)] + parts, 0
        out.append({**m, "content": parts})
    return out


class Adapter:
    name = "base"
    model_types: tuple[str, ...] = ()
    auto_class: Any = AutoModelForImageTextToText
    multimodal = True
    generates_images = False  # an AR image generator (mmspec.load returns an ImagePipeline for it)

    @classmethod
    def matches(cls, config) -> bool:
        return config.model_type in cls.model_types

    # ---- inputs ---------------------------------------------------------------------------------------------------
    def chat(self, messages: Sequence[dict], n_images: int) -> list[dict]:
        """Text-content messages -> the messages this family's chat template takes (see `image_chat`)."""
        return image_chat(messages, n_images)

    def messages(self, prompt: str | list, n_images: int) -> list[dict]:
        """A prompt string becomes one user turn with the images first; a message list is the caller's own layout."""
        if isinstance(prompt, list):
            return prompt
        return self.chat([{"role": "user", "content": prompt}], n_images)

    def prepare(self, processor, prompt: str | list, images: Sequence) -> BatchFeature:
        if images and not self.multimodal:
            raise InputError(f"this target ({self.name}) is a text-only model and cannot take images")
        text = processor.apply_chat_template(self.messages(prompt, len(images)), add_generation_prompt=True, tokenize=False)
        kwargs = {"images": list(images)} if images else {}
        return processor(text=text, return_tensors="pt", **kwargs)

    def image_token_id(self, config) -> int | None:
        for name in ("image_token_id", "image_token_index"):
            value = getattr(config, name, None)
            if value is not None:
                return int(value)
        return None

    def count_images(self, inputs: dict) -> int:
        """Images in the processed inputs (per-image grids or sizes where the family has them, else pixel batches)."""
        for key in ("image_grid_thw", "image_sizes"):
            if inputs.get(key) is not None:
                return int(inputs[key].shape[0])
        pv = inputs.get("pixel_values")
        return int(pv.shape[0]) if pv is not None and pv.dim() == 4 else 0

    # ---- positions ------------------------------------------------------------------------------------------------
    def row_positions(self, model: nn.Module, inputs: dict) -> tuple[Tensor, Tensor]:
        """[B, n] 1-D target positions of every row's prompt tokens and [B] each row's position of its first new token.
        Rows may be left-padded (attention_mask 0): a row's first real token sits at 0, as generate numbers it."""
        ids = inputs["input_ids"]
        mask = inputs.get("attention_mask")
        if mask is None:
            n = ids.shape[1]
            return torch.arange(n, device=ids.device).expand(ids.shape[0], n), torch.full((ids.shape[0],), n)
        real = mask.long()
        return (real.cumsum(-1) - 1).clamp(min=0), real.sum(-1).cpu()

    def prefill_position_ids(self, inputs: dict, positions: Tensor) -> Tensor | None:
        """What the prefill passes as position_ids for left-padded rows ([B, n] from row_positions); None leaves them
        to the model (M-RoPE families derive them from the attention mask and image grids themselves)."""
        return self.position_ids(positions)

    def prompt_positions(self, model: nn.Module, inputs: dict) -> tuple[Tensor, int]:
        """Row 0's 1-D target positions [n] and the position of its first new token."""
        pos, nxt = self.row_positions(model, inputs)
        return pos[0], int(nxt[0])

    def position_ids(self, positions: Tensor) -> Tensor:
        """[B, T] positions of tree tokens -> what the target's forward takes as position_ids."""
        return positions


class TextAdapter(Adapter):
    """Plain causal LMs (and the text path of anything that loads with AutoModelForCausalLM)."""

    name = "text"
    multimodal = False
    auto_class = AutoModelForCausalLM

    @classmethod
    def matches(cls, config) -> bool:
        return getattr(config, "vision_config", None) is None

    def prepare(self, processor, prompt: str | list, images: Sequence) -> BatchFeature:
        if images:
            raise InputError("this target is a text-only language model and cannot take images; pass images=None")
        tok = processor
        if getattr(tok, "chat_template", None):
            text = tok.apply_chat_template(self.messages(prompt, 0), add_generation_prompt=True, tokenize=False)
            return tok(text, return_tensors="pt", add_special_tokens=False)
        return tok(prompt if isinstance(prompt, str) else prompt[-1]["content"], return_tensors="pt")

    def chat(self, messages: Sequence[dict], n_images: int) -> list[dict]:
        if n_images:
            raise InputError("this target is a text-only language model and cannot take images; pass images=None")
        return [dict(m) for m in messages]
