"""Any other transformers image-text-to-text model whose language model is a plain decoder: it takes a custom 4-D
attention mask and 1-D position ids, and loads with AutoModelForImageTextToText. Families with their own mask rules
(bidirectional image blocks, sliding windows) need a dedicated adapter and are refused by the cache edit."""

from .base import Adapter


class GenericVLMAdapter(Adapter):
    name = "generic"

    @classmethod
    def matches(cls, config) -> bool:
        return getattr(config, "vision_config", None) is not None and getattr(config, "text_config", None) is not None
