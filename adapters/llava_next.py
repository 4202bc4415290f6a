"""LLaVA-NeXT / 1.6 (LlavaNextForConditionalGeneration): anyres image tiling expands one image into many tokens in the
processor; the decoder is a normal 1-D RoPE model, so the engine needs nothing beyond the base adapter."""

from .base import Adapter


class LlavaNextAdapter(Adapter):
    name = "llava_next"
    model_types = ("llava_next",)
