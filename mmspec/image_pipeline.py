"""Image generation: `mmspec.load("mini-gen")` -> ImagePipeline with prepare / generate_image / stream_image.

The target is an AR image generator (Janus family): it writes an image as N VQ codes in raster order, each one forward
of its decoder, with classifier-free guidance over a cond and an uncond row. Here both rows are verified with one draft
tree per forward (engine.decode with `guidance(scale)`), the drafter reads the cond row, and the acceptance rule is a
parameter: `Exact()` is lossless, `Lantern` / `LanternPP` accept a drafted code also for the target mass of its nearest
codes in the VQ latent space (Jang et al., ICLR 2025; Park et al., 2025), `Grouped` for the mass of a dynamic group
(So et al., ICCV 2025), each within its bound. Drafting is a parameter too: a trained drafter's tree, or training-free
Jacobi windows (mmspec.jacobi) that need no drafter at all.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from PIL import Image
from torch import Tensor
from transformers import BatchFeature, LogitsProcessorList

from .acceptance import EXACT, AcceptanceRule, check_rule
from .config import AutoTreeConfig, SamplingConfig, TreeConfig, seeded_generator
from .drafter import Drafter
from .engine import Stats, StepEvent, decode, first_row, guidance
from .errors import InputError, InputTypeError
from .image_target import ImageRunner
from .jacobi import JacobiConfig, JacobiProposer
from .proposer import EagleProposer, NullProposer
from .tree import DraftTree
from .verify import acceptor

logger = logging.getLogger(__name__)

NEIGHBOURS_K = 64  # columns of the neighbour table computed once per target; a rule may read up to this many


@dataclass(frozen=True)
class ImageResult:
    image: Image.Image  # decoded by the target's own VQ decoder
    token_ids: list[int]  # the image's VQ codes, raster order
    stats: Stats


@dataclass(frozen=True)
class ImageStreamEvent:
    token_ids: tuple[int, ...]  # codes committed by this step
    num_accepted: int  # drafted codes the target accepted this step
    image: Image.Image | None  # the rows decoded so far when this step completed a row, else None
    stats: Stats  # running totals
    tree: DraftTree | None = None  # the draft tree verified this step (None for the prefill step)
    path: tuple[int, ...] = ()  # the tree's accepted nodes, root first


@torch.no_grad()
def neighbour_table(codebook: Tensor, k: int, chunk: int = 1024) -> Tensor:
    """codebook [V, D] in the VQ's geometry (rows l2-normalised: cosine) -> [V, k] long: each code's k nearest other
    codes, nearest first, itself excluded. Row chunks keep a 16k-entry codebook's similarity matrix out of memory."""
    v = codebook.shape[0]
    if not 1 <= k < v:
        raise InputError(f"k={k} neighbours asked of a {v}-code codebook; k must be between 1 and {v - 1}")
    out = []
    for start in range(0, v, chunk):
        sim = codebook[start : start + chunk] @ codebook.T  # [c, V]
        sim[torch.arange(sim.shape[0]), torch.arange(start, start + sim.shape[0])] = float("-inf")
        out.append(sim.topk(k, dim=-1).indices)
    return torch.cat(out)


def check_guidance(scale: object) -> float:
    # finite too: an infinite scale turns every guided logit into inf - inf = NaN
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 <= scale < math.inf:
        raise InputError(f"guidance_scale must be a finite number >= 0 (1 = no guidance, Janus uses 5), got {scale!r}")
    return float(scale)


class ImagePipeline:
    def __init__(self, target, processor, adapter, drafter: Drafter | None, tree: TreeConfig,
                 source: str | None = None, tuner: Callable | None = None) -> None:
        self.target = target
        self.source = source  # where target and drafter came from: the auto tree's cache key (None: not cached)
        # (pipe, rules, source) -> {repr(rule): (TreeConfig, record)}: what measures the `auto` tree of a rule;
        # mmspec.load gives image_autotune.tune_image_trees. None: `auto` stays the shape it was built with.
        self.tuner = tuner
        self.tuned: dict = {}  # repr(acceptance rule) -> (TreeConfig, tuning record), under TreeConfig.preset("auto")
        self.processor = processor
        self.adapter = adapter
        self.drafter = drafter
        self.tree = tree
        self.jacobi = JacobiConfig()  # the window draft="jacobi" drafts with
        self.runner = ImageRunner(target, adapter)
        self.device = self.runner.device
        gc = target.generation_config
        if gc.bos_token_id is None or gc.pad_token_id is None:
            raise InputError("the target's generation_config needs bos_token_id and pad_token_id (Janus builds the "
                             "unconditional row from them)")
        self.special = (int(gc.bos_token_id), adapter.boi_token_id(processor), int(gc.pad_token_id))
        self._refuse_processors()
        self._tables: dict[int, Tensor] = {}

    def _refuse_processors(self) -> None:
        """Janus's image generate runs the generation_config's logits processors against the prompt ids only; mmspec
        does not reproduce that, so a config that would add any (repetition_penalty, ...) is refused."""
        gc = copy.deepcopy(self.target.generation_config)
        gc.do_sample, gc.guidance_scale = False, None
        procs = self.target._get_logits_processor(
            generation_config=gc, input_ids_seq_length=1, encoder_input_ids=torch.zeros(1, 1, dtype=torch.long),
            prefix_allowed_tokens_fn=None, logits_processor=LogitsProcessorList(), device=self.device)
        if len(procs):
            names = ", ".join(type(p).__name__ for p in procs)
            raise InputError(f"the target's generation_config sets logits processors ({names}) that mmspec does not "
                             f"apply to image codes; reset those fields in generation_config.json")

    # ---- inputs and tables ---------------------------------------------------------------------------------------
    def prepare(self, prompt: str) -> BatchFeature:
        """Exactly what the target's own image generate takes: the chat template plus `<begin_of_image>`, one row."""
        if not isinstance(prompt, (str, list)):
            raise InputTypeError(f"prompt must be a string, got {type(prompt).__name__}")
        if isinstance(prompt, str) and not prompt.strip():
            raise InputError("the prompt is empty; describe the image to generate")
        return self.adapter.prepare(self.processor, prompt, []).to(self.device)

    @property
    def neighbours(self) -> Tensor:
        """[codebook_size, k] long: each code's nearest other codes in the VQ's geometry, nearest first."""
        return self.neighbours_for(min(NEIGHBOURS_K, self.codebook_size - 1))

    @property
    def codebook_size(self) -> int:
        return int(self.adapter.codebook(self.target).shape[0])

    def neighbours_for(self, k: int) -> Tensor:
        width = max([k] + [w for w in self._tables])
        if width not in self._tables:
            self._tables = {width: neighbour_table(self.adapter.codebook(self.target), width).to(self.device)}
        return self._tables[width]

    @property
    def boi_token_id(self) -> int:
        """Janus's `<begin_of_image>` id; set `generation_config.generation_kwargs = {"boi_token_id": ...}` to it
        before calling the target's own generate on a reloaded checkpoint (from_pretrained drops it)."""
        return self.special[1]

    # ---- generation ----------------------------------------------------------------------------------------------
    def _events(self, prompt: str, guidance_scale: float = 5.0, temperature: float = 1.0, top_k: int = 0,
                top_p: float = 1.0, seed: int | None = None, acceptance: AcceptanceRule = EXACT,
                speculative: bool = True, draft: str | JacobiConfig | None = None) -> Iterator[StepEvent]:
        scale = check_guidance(guidance_scale)
        sampling = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p)
        rule = check_rule(acceptance)
        drafting = self.drafting(draft) if speculative else None
        neighbours = self.neighbours_for(rule.k) if rule.relaxed else None
        rows, combine = self.rows_and_combine(prompt, scale)
        generator = seeded_generator(self.device, seed)
        n_codes = self.adapter.num_codes(self.target)
        if isinstance(drafting, JacobiConfig):
            proposer = JacobiProposer(drafting, sampling, generator, n_codes, self.codebook_size)
        elif drafting == "drafter" and self.tree_for(rule).total_tokens > 1:
            proposer = self.proposer(self.tree_for(rule), scale, sampling, generator)
        else:
            proposer = NullProposer()
        accept = acceptor(rule, sampling, generator, neighbours)
        return decode(self.runner, proposer, rows, accept, n_codes, frozenset(), None, combine)

    def drafting(self, draft: str | JacobiConfig | None = None) -> str | JacobiConfig:
        """What drafts the codes: "drafter" (the loaded drafter's tree), "jacobi" (training-free windows of
        `self.jacobi`) or a JacobiConfig; None picks the drafter when one is loaded, else jacobi."""
        if draft is None:
            draft = "drafter" if self.drafter is not None else "jacobi"
        if isinstance(draft, JacobiConfig):
            return draft
        if draft == "jacobi":
            return self.jacobi
        if draft != "drafter":
            raise InputError(f"draft must be 'drafter', 'jacobi' or a mmspec.JacobiConfig, got {draft!r}")
        if self.drafter is None:
            raise InputError("draft='drafter' needs a drafter; load one, or draft='jacobi' (training-free)")
        return draft

    def rows_and_combine(self, prompt: str, scale: float) -> tuple[dict, Callable[[Tensor], Tensor]]:
        """The rows one image decodes (cond, uncond; the cond row alone at scale 1, where the uncond row would be
        computed and multiplied by zero) and how their logits combine into the distribution codes are drawn from."""
        inputs = self.prepare(prompt)
        n_codes = self.adapter.num_codes(self.target)
        ctx = self.runner.max_context
        if ctx and inputs["input_ids"].shape[1] + n_codes > ctx:
            raise InputError(f"the prompt ({inputs['input_ids'].shape[1]} tokens) plus {n_codes} image codes exceeds "
                             f"the target's context of {ctx}; shorten the prompt")
        if scale == 1.0:
            return inputs, first_row
        return self.adapter.guidance_rows(inputs, *self.special), guidance(scale)

    def proposer(self, tree: TreeConfig, scale: float, sampling: SamplingConfig | None = None,
                 generator: torch.Generator | None = None) -> EagleProposer:
        """The drafter's proposer for one image: on the cond row, or on both rows combined as the target's logits
        for a drafter trained that way (draft_rows=2). With `sampling` above temperature 0 a chain tree (top_k 1)
        draws its drafts from the drafter (EagleProposer)."""
        both = self.drafter.config.draft_rows == 2 and scale != 1.0
        return EagleProposer(self.drafter, tree, guidance(scale) if both else None, sampling=sampling,
                             generator=generator)

    def tree_for(self, acceptance: AcceptanceRule = EXACT) -> TreeConfig:
        """The tree generate_image drafts with under `acceptance`: the pipeline's own, or with
        `TreeConfig.preset("auto")` the shape measured fastest for this rule on this machine (mmspec.image_autotune,
        measured on first use, cached on disk)."""
        if not isinstance(self.tree, AutoTreeConfig) or self.drafter is None:
            return self.tree
        if repr(acceptance) not in self.tuned:
            self.tune([acceptance])
        return self.tuned[repr(acceptance)][0] if repr(acceptance) in self.tuned else self.tree

    def with_tree(self, tree: TreeConfig) -> "ImagePipeline":
        """This pipeline (the same models) drafting with a fixed `tree`: what a tuner probes with. It has its own
        runner (the mask state of a generation), so it may run beside this one (a demo request beside a tuner)."""
        clone = copy.copy(self)
        clone.tree, clone.tuned, clone.runner = tree, {}, ImageRunner(self.target, self.adapter)
        return clone

    def tune(self, rules: list) -> None:
        """Measure (or read from the cache) the auto tree of several rules with one calibration."""
        todo = list({repr(r): r for r in rules if repr(r) not in self.tuned}.values())
        if not todo or not isinstance(self.tree, AutoTreeConfig) or self.drafter is None or self.tuner is None:
            return
        for name, (tree, entry) in self.tuner(self, todo, self.source).items():
            self.tuned[name] = (tree, entry)
            logger.info("tree auto for %s: depth %d, top_k %d, total_tokens %d (expected tau %.2f, %.2fx)", name,
                        tree.depth, tree.top_k, tree.total_tokens, entry.get("expected_tau", 0),
                        entry.get("expected_speedup", 0))

    def stream_image(self, prompt: str, **kwargs) -> Iterator[ImageStreamEvent]:
        """One event per verify step; `image` shows the rows completed so far whenever a step completes one (the rest
        of the picture gray). Keyword arguments as for `generate_image`."""
        codes: list[int] = []
        grid, n_codes = self.adapter.grid(self.target), self.adapter.num_codes(self.target)
        rows_shown = 0
        for ev in self._events(prompt, **kwargs):
            codes.extend(ev.token_ids)
            image = None
            if len(codes) // grid > rows_shown:
                rows_shown = len(codes) // grid
                image = self.image_of(codes) if len(codes) == n_codes else self._partial(codes, rows_shown, grid)
            yield ImageStreamEvent(ev.token_ids, ev.num_accepted, image, ev.stats, ev.tree, ev.path)

    def generate_image(self, prompt: str, *, guidance_scale: float = 5.0, temperature: float = 1.0, top_k: int = 0,
                       top_p: float = 1.0, seed: int | None = None, acceptance: AcceptanceRule = EXACT,
                       speculative: bool = True, draft: str | JacobiConfig | None = None) -> ImageResult:
        """Generate one image. `Exact()` at temperature 0 gives the codes of the target's own greedy CFG generate
        (`generate(**prepare(p), generation_mode="image", do_sample=False, guidance_scale=s)`), above it the target's
        distribution; a relaxed rule moves each code's distribution by at most its bound. `draft`: see `drafting`."""
        codes: list[int] = []
        stats = Stats()
        for ev in self._events(prompt, guidance_scale, temperature, top_k, top_p, seed, acceptance, speculative,
                               draft):
            codes.extend(ev.token_ids)
            stats = ev.stats
        return ImageResult(self.image_of(codes), codes, stats)

    # ---- decoding ------------------------------------------------------------------------------------------------
    def image_of(self, codes: list[int] | Tensor) -> Image.Image:
        """A full image's codes -> the picture, by the target's own VQ decoder."""
        return self.adapter.decode_image(self.target, self.processor, torch.as_tensor(codes, device=self.device))

    def _partial(self, codes: list[int], rows: int, grid: int) -> Image.Image:
        """The first `rows` code rows decoded (the missing codes repeat the last row, so the decoder sees a plausible
        continuation at the seam), everything below them gray."""
        n = rows * grid
        last_row = codes[n - grid : n]
        full = codes[:n] + last_row * (grid - rows)
        image = self.image_of(full)
        cut = image.height * rows // grid
        gray = Image.new("RGB", (image.width, image.height - cut), (128, 128, 128))
        image.paste(gray, (0, cut))
        return image
