"""mmspec: multimodal speculative decoding. EAGLE-style tree drafting, lossless over unmodified transformers VLMs.

    pipe = mmspec.load("mini-vlm")
    res = pipe.generate("Describe the image.", images=["scene.png"])
"""

from .acceptance import Exact
from .config import SamplingConfig, TreeConfig
from .drafter import Drafter, DrafterConfig
from .engine import Stats, StepEvent
from .errors import UserError
from .pipeline import GenerationResult, Pipeline, StreamEvent, load
from .tree import DraftTree
from .verify import Acceptance, accept_greedy, accept_sampling

__version__ = "0.1.0"

__all__ = [
    "Acceptance",
    "DraftTree",
    "Drafter",
    "DrafterConfig",
    "Exact",
    "GenerationResult",
    "Pipeline",
    "SamplingConfig",
    "Stats",
    "StepEvent",
    "StreamEvent",
    "TreeConfig",
    "UserError",
    "accept_greedy",
    "accept_sampling",
    "load",
]
