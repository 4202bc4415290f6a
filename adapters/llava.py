"""LLaVA 1.5 (LlavaForConditionalGeneration): CLIP tower, MLP projector, Llama-style decoder, 1-D RoPE."""

from .base import Adapter


class LlavaAdapter(Adapter):
    name = "llava"
    model_types = ("llava",)
