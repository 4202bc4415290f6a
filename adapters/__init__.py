"""Target-family adapters, installed as mmspec.adapters. `adapter_for(config)` picks one; the first match wins, so the
dedicated families come before the generic fallbacks."""

from __future__ import annotations

from mmspec.errors import InputError

from .base import Adapter, TextAdapter
from .generic import GenericVLMAdapter
from .janus import JanusAdapter
from .llava import LlavaAdapter
from .llava_next import LlavaNextAdapter
from .qwen2_vl import Qwen2VLAdapter

ADAPTERS: tuple[type[Adapter], ...] = (
    LlavaAdapter, LlavaNextAdapter, Qwen2VLAdapter, JanusAdapter, GenericVLMAdapter, TextAdapter
)

SUPPORTED = "LLaVA 1.5 (llava), LLaVA-NeXT (llava_next), Qwen2-VL / Qwen2.5-VL (qwen2_vl, qwen2_5_vl), other " \
    "image-text-to-text models with a plain decoder (generic), text-only causal LMs (text), and Janus / Janus-Pro " \
    "image generation (janus)"


def adapter_for(config) -> Adapter:
    for cls in ADAPTERS:
        if cls.matches(config):
            return cls()
    raise InputError(f"no mmspec adapter for model type {config.model_type!r}; supported: {SUPPORTED}")


def generates_images(config) -> bool:
    """True for AR image generators (their drafters draft image codes); never raises for an unknown family."""
    return any(cls.generates_images and cls.matches(config) for cls in ADAPTERS)


__all__ = ["ADAPTERS", "Adapter", "SUPPORTED", "adapter_for", "generates_images"]
