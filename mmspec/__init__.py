"""mmspec: multimodal speculative decoding. EAGLE-style tree drafting, lossless over unmodified transformers VLMs.

    pipe = mmspec.load("mini-vlm")
    res = pipe.generate("Describe the image.", images=["scene.png"])
"""

from .config import SamplingConfig, TreeConfig
from .drafter import Drafter, DrafterConfig
from .engine import Stats, StepEvent
from .pipeline import GenerationResult, Pipeline, StreamEvent, load
from .tree import DraftTree
from .verify import Acceptance, accept_greedy, accept_sampling

__version__ = "0.1.0"

__all__ = [
    "Acceptance",
    "DraftTree",
    "Drafter",
    "DrafterConfig",
    "GenerationResult",
    "Pipeline",
    "SamplingConfig",
    "Stats",
    "StepEvent",
    "StreamEvent",
    "TreeConfig",
    "accept_greedy",
    "accept_sampling",
    "load",
]
