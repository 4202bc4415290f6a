"""Janus family (Janus, Janus-Pro, the built-in mini-gen) in image-generation mode, through the model's public modules.

What `JanusForConditionalGeneration.generate(generation_mode="image")` does, taken apart so a tree can be verified:
- the prompt is the chat template plus `<begin_of_image>` (the processor's `generation_mode="image"`);
- classifier-free guidance runs a second, unconditional row: the same ids with every token other than BOS and BOI
  replaced by the pad id (same length), so both rows share positions and one tree;
- prompt tokens are embedded by the text embedding, image codes by `prepare_embeddings_for_image_generation`;
- the decoder is `model.model.language_model`; its last hidden state goes through `model.model.generation_head`
  (not the LM head) to give code logits;
- the codes are decoded by the VQ model (`decode_image_tokens`), whose codebook lookup l2-normalises: the codebook's
  geometry is cosine.

`GenerationConfig.from_pretrained` drops the `generation_kwargs` entry that holds Janus's `boi_token_id`, so Janus's
own generate fails on a reloaded checkpoint; mmspec reads the id from the tokenizer (`boi_token`) and `boi_token_id`
sets it back for callers of generate.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from transformers import BatchFeature, JanusForConditionalGeneration

from mmspec.errors import InputError

from .base import Adapter


class CodeEmbedding(nn.Module):
    """Image codes -> the decoder's input embeddings (generation embeddings + aligner), as one module the drafter can
    share like a token embedding."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self._model = (model,)  # a tuple keeps the target's weights out of this module's state

    @property
    def weight(self) -> Tensor:  # device / dtype probes read this, as on an nn.Embedding
        return self._model[0].model.generation_embeddings.weight

    def forward(self, codes: Tensor) -> Tensor:
        return self._model[0].prepare_embeddings_for_image_generation(codes)


class JanusAdapter(Adapter):
    name = "janus"
    model_types = ("janus",)
    auto_class = JanusForConditionalGeneration
    generates_images = True

    def prepare(self, processor, prompt: str | list, images: Sequence) -> BatchFeature:
        """One row, exactly what Janus's image generate takes: chat template + `<begin_of_image>`."""
        if images:
            raise InputError("image generation takes a text prompt only; pass no images")
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": [{"type": "text", "text": prompt}]}]
        text = processor.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
        return processor(text=text, generation_mode="image", return_tensors="pt")

    def boi_token_id(self, processor) -> int:
        tok = processor.tokenizer
        return int(tok.convert_tokens_to_ids(tok.boi_token))

    def guidance_rows(self, inputs: dict, bos_id: int, boi_id: int, pad_id: int) -> dict:
        """[1, n] prompt -> rows (cond, uncond) as Janus's generate builds them: the uncond row keeps BOS and BOI and
        pads the rest."""
        ids = inputs["input_ids"]
        uncond = ids.masked_fill((ids != bos_id) & (ids != boi_id), pad_id)
        both = torch.cat([ids, uncond])
        return {"input_ids": both, "attention_mask": torch.ones_like(both)}

    # ---- the modules a tree is verified through ------------------------------------------------------------------
    def decoder(self, model: nn.Module) -> nn.Module:
        return model.model.language_model

    def embed_prompt(self, model: nn.Module, ids: Tensor) -> Tensor:
        return model.get_input_embeddings()(ids)

    def code_embedding(self, model: nn.Module) -> nn.Module:
        return CodeEmbedding(model)

    def code_head(self, model: nn.Module) -> nn.Module:
        return model.model.generation_head

    # ---- the image side ------------------------------------------------------------------------------------------
    def num_codes(self, model: nn.Module) -> int:
        """Codes per image (raster order)."""
        return int(model.config.vision_config.num_image_tokens)

    def grid(self, model: nn.Module) -> int:
        """Codes per image row (the VQ grid is square)."""
        return int(model.config.vq_config.num_patches)

    def codebook(self, model: nn.Module) -> Tensor:
        """[V, D] code vectors in the geometry the VQ decodes with: l2-normalised (get_codebook_entry), so cosine."""
        return F.normalize(model.model.vqmodel.quantize.embedding.weight.detach().float(), dim=-1)

    @torch.no_grad()
    def decode_image(self, model: nn.Module, processor, codes: Tensor) -> Image.Image:
        """[N] codes (raster order, N = num_codes) -> the image, decoded by the target's own VQ decoder."""
        pixels = model.decode_image_tokens(codes.reshape(1, -1).to(model.device))  # [1, H, W, C], normalised
        # the processor undoes its own normalisation; its PIL return type is broken in 5.24, so convert here
        rgb = processor.postprocess(list(pixels.float()), return_tensors="pt")["pixel_values"][0]  # [C, H, W] uint8
        return Image.fromarray(rgb.permute(1, 2, 0).cpu().numpy())
