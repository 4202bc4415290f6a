"""mmspec: multimodal speculative decoding. EAGLE-style tree drafting, lossless over unmodified transformers VLMs.

    pipe = mmspec.load("mini-vlm")
    res = pipe.generate("Describe the image.", images=["scene.png"])
    gen = mmspec.load("mini-gen")
    img = gen.generate_image("a big red circle at the top left", acceptance=mmspec.Lantern(k=8, delta=0.2)).image
"""

from .acceptance import Exact, Grouped, Lantern, LanternPP
from .config import SamplingConfig, TreeConfig
from .drafter import Drafter, DrafterConfig
from .engine import Stats, StepEvent
from .errors import UserError
from .pipeline import GenerationResult, Pipeline, StreamEvent, load
from .tree import DraftTree
from .verify import Acceptance, accept_greedy, accept_sampling

from .image_pipeline import ImagePipeline, ImageResult
from .jacobi import JacobiConfig

__version__ = "0.1.0"

__all__ = [
    "Acceptance",
    "DraftTree",
    "Drafter",
    "DrafterConfig",
    "Exact",
    "Grouped",
    "ImagePipeline",
    "ImageResult",
    "JacobiConfig",
    "Lantern",
    "LanternPP",
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
