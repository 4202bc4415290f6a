"""The public entry point: `mmspec.load(...)` -> Pipeline with prepare / generate / stream."""

from __future__ import annotations

import copy
import functools
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from transformers import AutoProcessor, AutoTokenizer, BatchFeature, GenerationConfig

from .acceptance import EXACT, AcceptanceRule, check_rule
from .adapters import Adapter, adapter_for
from .autotune import auto_tree
from .config import AutoTreeConfig, SamplingConfig, TreeConfig, check_max_new_tokens, seeded_generator
from .drafter import Drafter
from .engine import Stats, StepEvent, decode
from .errors import InputError, InputTypeError
from .image_autotune import tune_image_trees
from .image_pipeline import ImagePipeline
from .images import cast_pixels, load_images
from .processing import NodeProcessor, check_generation_config
from .proposer import EagleProposer, NullProposer
from .registry import BUILTIN_DRAFTERS, BUILTIN_TARGETS, resolve_dir, target_config
from .target import TargetRunner
from .tree import DraftTree
from .verify import acceptor

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerationResult:
    text: str
    token_ids: list[int]  # new tokens only
    stats: Stats


@dataclass(frozen=True)
class StreamEvent:
    text: str  # decoded text added by this step
    token_ids: tuple[int, ...]  # tokens committed by this step
    num_accepted: int  # drafted tokens the target accepted this step
    stats: Stats  # running totals
    tree: DraftTree | None = None  # the draft tree verified this step (None for the prefill step)
    path: tuple[int, ...] = ()  # the tree's accepted nodes, root first


def load(
    target: str | os.PathLike,
    drafter: str | os.PathLike | Drafter | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    tree: TreeConfig = TreeConfig(),
    device_map: str | dict | None = None,
    draft_dtype: torch.dtype | str | None = None,
    generation_config: GenerationConfig | None = None,
    trust_pickle: bool = False,
) -> "Pipeline":
    """Load a target (and its drafter) ready for speculative decoding: a Pipeline for text and VLM targets, an
    ImagePipeline (generate_image / stream_image) for AR image generators (Janus family, mini-gen).

    drafter: None -> the drafter shipped with a built-in target (an image generator without one drafts training-free
    Jacobi windows); a directory from Drafter.save_pretrained; a built-in drafter name; a Drafter instance;
    "untrained" (random init, for experiments); "none" (no drafter: Jacobi drafting for an image generator, plain
    decoding for a text target); or a published EAGLE-3 (SpecForge / SGLang / vLLM) or EAGLE-1/2 checkpoint,
    recognised from its config and tensor names (mmspec.external_drafters; a pickle such as pytorch_model.bin only
    with trust_pickle=True). device_map="auto" shards a large
    target across devices through accelerate; the drafter then sits with the LM head.
    draft_dtype: the drafter's own dtype; None -> see `default_draft_dtype` (a Drafter instance: the target's dtype).
    It changes which tokens get proposed, never what is output: the target verifies every one in its own dtype.
    generation_config: replaces the target's own (repetition_penalty, no_repeat_ngram_size, min_new_tokens, EOS, ...)
    for everything this pipeline decodes; see mmspec.processing for what is honoured and what is refused.
    """
    if not isinstance(tree, TreeConfig):
        raise InputTypeError(f"tree must be a mmspec.TreeConfig, got {type(tree).__name__}")
    if device_map is None:
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype, draft_dtype = _as_dtype(dtype, "dtype"), _as_dtype(draft_dtype, "draft_dtype")
    if dtype is None:
        on_gpu = device_map is not None or device.type == "cuda"
        dtype = torch.bfloat16 if on_gpu else torch.float32

    model, processor, adapter = load_target(target, device=device, dtype=dtype, device_map=device_map)
    target_name = str(target)
    builtin = target_name in BUILTIN_TARGETS
    if adapter.generates_images:
        if generation_config is not None:
            raise InputError("generation_config applies to text generation; an image generator takes guidance_scale, "
                             "temperature, top_k and top_p in generate_image")
        if drafter is None and not builtin:
            logger.info("%s ships no drafter: images are drafted with training-free Jacobi windows", target_name)
            drafter = "none"
        drafter_obj = _load_drafter(drafter, model, target_name, builtin, draft_dtype, trust_pickle)
        return ImagePipeline(model, processor, adapter, drafter_obj, tree, _cache_source(target_name, drafter),
                             tuner=tune_image_trees)
    pipe_config = generation_config if generation_config is not None else model.generation_config
    check_generation_config(pipe_config)  # before the drafter loads: a refusal should cost nothing
    drafter_obj = _load_drafter(drafter, model, target_name, builtin, draft_dtype, trust_pickle)
    pipe = Pipeline(model, processor, adapter, drafter_obj, tree, pipe_config)
    if isinstance(tree, AutoTreeConfig) and drafter_obj is not None:
        pipe.tree = auto_tree(pipe, _cache_source(target_name, drafter))
    return pipe


def _cache_source(target_name: str, drafter) -> str | None:
    """The auto tree's cache key for these models: where they came from; a Drafter instance may be mid-training, so
    it is measured every time (None)."""
    return None if isinstance(drafter, Drafter) else f"{_source(target_name)} + {_source(drafter or 'builtin')}"


def _source(name: Any) -> str:
    """A model's identity for caches: the built-in name, else its absolute path (or hub id)."""
    name = str(name)
    return name if name in BUILTIN_TARGETS or name in BUILTIN_DRAFTERS or not os.path.exists(name) \
        else os.path.abspath(name)


def _as_dtype(value: torch.dtype | str | None, what: str) -> torch.dtype | None:
    if value is None or value in (torch.float32, torch.bfloat16, torch.float16):
        return value
    name = str(value).removeprefix("torch.")
    if name not in ("float32", "bfloat16", "float16"):
        raise InputError(f"unknown {what} {value!r}; use float32, bfloat16 or float16")
    return getattr(torch, name)


def cpu_native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX); elsewhere bf16 math is emulated and slow."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def default_draft_dtype(target_dtype: torch.dtype, device: torch.device, hidden_size: int = 0,
                        intermediate_size: int = 0) -> torch.dtype:
    """The drafter runs in the target's dtype, except beside an fp32 target on a CPU that multiplies bfloat16 natively
    (AVX512-BF16 or AMX), where it runs in whichever of fp32 and bf16 multiplies its weights faster here. Why measure:
    a draft step multiplies a few rows (the beam) by every drafter weight, so bf16 halves the bytes read, but oneDNN's
    bf16 call has a fixed cost that small weights never earn back, and where the two cross differs between machines
    (the measurements are in docs/speed.md). The target's verify keeps the output exact either way; only acceptance
    can move."""
    if device.type != "cpu" or target_dtype != torch.float32:
        return target_dtype
    if not cpu_native_bf16():
        return torch.float32
    return _faster_matmul_dtype(hidden_size, intermediate_size) if hidden_size else torch.bfloat16


@functools.lru_cache(maxsize=None)
def _faster_matmul_dtype(hidden: int, intermediate: int) -> torch.dtype:
    """fp32 or bf16, whichever multiplies 4 rows by the drafter's MLP weight faster (alternating, best of 20 each)."""
    g = torch.Generator().manual_seed(0)
    best = {}
    for dtype in (torch.float32, torch.bfloat16):
        x, w = torch.randn(4, hidden, generator=g).to(dtype), torch.randn(intermediate, hidden, generator=g).to(dtype)
        best[dtype] = (x, w, [])
    with torch.no_grad():
        for _ in range(25):
            for dtype, (x, w, times) in best.items():
                t = time.perf_counter()
                torch.nn.functional.linear(x, w)
                times.append(time.perf_counter() - t)
    return min(best, key=lambda d: sorted(best[d][2][5:])[0])  # the first 5 warm up


def load_target(target: str | os.PathLike, *, device=None, dtype: torch.dtype = torch.float32, device_map=None):
    """The unmodified transformers model, its processor (tokenizer for text-only models) and its adapter."""
    path, config = target_config(target)
    adapter = adapter_for(config)
    placement = {"device_map": device_map} if device_map is not None else {}
    model = adapter.auto_class.from_pretrained(
        path, dtype=dtype, attn_implementation="sdpa", local_files_only=True, **placement
    )
    if device_map is None:
        model.to(device or "cpu")
    model.eval()
    loader = AutoProcessor if adapter.multimodal else AutoTokenizer
    processor = loader.from_pretrained(path, local_files_only=True)
    return model, processor, adapter


def _load_drafter(drafter: Any, model, target_name: str, builtin: bool, dtype: torch.dtype | None,
                  trust_pickle: bool = False) -> Drafter | None:
    if drafter is None:
        if not builtin:
            raise InputError(
                f"target {target_name!r} has no built-in drafter: pass drafter=<directory saved by "
                f"Drafter.save_pretrained>, a built-in drafter name ({', '.join(sorted(BUILTIN_DRAFTERS))}), or "
                f"'untrained'; train one with `mmspec train-drafter`"
            )
        drafter = BUILTIN_TARGETS[target_name]
    if str(drafter) == "none":
        return None
    if isinstance(drafter, Drafter):
        d = drafter.bind(model)
    elif str(drafter) == "untrained":
        logger.warning("using an untrained (random) drafter: output is still exact, but almost nothing gets accepted")
        sees = getattr(model.config, "vision_config", None) is not None and any(
            getattr(model.config, k, None) is not None for k in ("image_token_id", "image_token_index")
        )
        d = Drafter.for_target(model, vision_adaptor=sees)
    else:
        from .external_drafters import load_drafter

        d = load_drafter(resolve_dir(drafter, "drafter"), model, trust_pickle=trust_pickle)
    head = model.get_output_embeddings().weight
    if dtype is None:  # a Drafter the caller holds (maybe mid-training) keeps the target's dtype, as it always has
        dtype = head.dtype if isinstance(drafter, Drafter) else default_draft_dtype(
            head.dtype, head.device, d.config.hidden_size, d.config.intermediate_size)
    return d.to(device=head.device, dtype=dtype).eval()


class Pipeline:
    def __init__(self, target, processor, adapter: Adapter, drafter: Drafter | None, tree: TreeConfig,
                 generation_config: GenerationConfig | None = None) -> None:
        self.target = target
        self.processor = processor
        self.adapter = adapter
        self.drafter = drafter
        self.tree = tree
        self.runner = TargetRunner(target, adapter)
        self.device = self.runner.device
        self.generation_config = check_generation_config(
            generation_config if generation_config is not None else target.generation_config
        )
        eos = self.generation_config.eos_token_id
        self.stop_ids = frozenset([eos] if isinstance(eos, int) else (eos or []))

    def with_tree(self, tree: TreeConfig) -> "Pipeline":
        """This pipeline (the same models) drafting with a fixed `tree`: what a tuner probes with. It has its own
        runner (the mask state of a generation), so it may run beside this one."""
        clone = copy.copy(self)
        clone.tree, clone.runner = tree, TargetRunner(self.target, self.adapter)
        return clone

    @property
    def tokenizer(self):
        return getattr(self.processor, "tokenizer", self.processor)

    def prepare(self, prompt: str | list, images: Any = None) -> BatchFeature:
        """The exact inputs fed to the target: chat template applied, images processed, on the target's device."""
        if not isinstance(prompt, (str, list)):
            raise InputTypeError(f"prompt must be a string or a list of chat messages, got {type(prompt).__name__}")
        inputs = self.adapter.prepare(self.processor, prompt, load_images(images))
        return cast_pixels(inputs.to(self.device), self.target.dtype)

    def _events(
        self,
        prompt: str | list,
        images: Any,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        speculative: bool = True,
        acceptance: AcceptanceRule = EXACT,
    ) -> Iterator[StepEvent]:
        sampling = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p)
        check_max_new_tokens(max_new_tokens)
        if check_rule(acceptance).relaxed:
            raise InputError(
                f"{type(acceptance).__name__} relaxes acceptance in an image generator's VQ latent space; a text target "
                f"takes only acceptance=mmspec.Exact()"
            )
        if speculative and self.drafter is None:
            raise InputError("speculative=True needs a drafter; load one or pass speculative=False")
        inputs = self.prepare(prompt, images)
        prompt_len = inputs["input_ids"].shape[1]
        self._check_context(prompt_len, max_new_tokens)
        generator = seeded_generator(self.device, seed)
        use_tree = speculative and self.tree.total_tokens > 1
        proposer = EagleProposer(self.drafter, self.tree) if use_tree else NullProposer()
        process = NodeProcessor(self.target, self.generation_config, prompt_len, max_new_tokens, self.device)
        accept = acceptor(acceptance, sampling, generator)
        return decode(self.runner, proposer, inputs, accept, max_new_tokens, self.stop_ids, process or None)

    def stream(self, prompt: str | list, images: Any = None, **kwargs) -> Iterator[StreamEvent]:
        """One event per verify step with the text it added. Keyword arguments as for `generate`.

        Text that ends inside a multi-byte character (a byte-level BPE can split one) is held back until it completes,
        so the pieces always concatenate to `generate(...).text`."""
        tokens: list[int] = []
        text = ""
        for ev in self._events(prompt, images, **kwargs):
            tokens.extend(ev.token_ids)
            full = self.tokenizer.decode(tokens, skip_special_tokens=True)
            if not ev.finished:
                full = full.rstrip("\ufffd")
            yield StreamEvent(full[len(text) :], ev.token_ids, ev.num_accepted, ev.stats, ev.tree, ev.path)
            text = full

    def generate(
        self,
        prompt: str | list,
        images: Any = None,
        *,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        speculative: bool = True,
        acceptance: AcceptanceRule = EXACT,
    ) -> GenerationResult:
        """Run to the end. At temperature 0 the tokens equal target.generate(**prepare(...), do_sample=False); above it
        they are distributed as the target's samples under the same temperature / top_k / top_p warp. The
        generation_config's processors (repetition_penalty, ...) apply as in generate; its sampling knobs do not."""
        tokens: list[int] = []
        stats = Stats()
        events = self._events(prompt, images, max_new_tokens, temperature, top_p, top_k, seed, speculative, acceptance)
        for ev in events:  # no per-step text decoding here, so wall time is the engine's own
            tokens.extend(ev.token_ids)
            stats = ev.stats
        return GenerationResult(self.tokenizer.decode(tokens, skip_special_tokens=True), tokens, stats)

    def _check_context(self, prompt_len: int, max_new_tokens: int) -> None:
        ctx = self.runner.max_context
        if ctx and prompt_len >= ctx:
            raise InputError(f"the prompt has {prompt_len} tokens, more than the target's context of {ctx}; shorten it")
        if ctx and prompt_len + max_new_tokens > ctx:
            raise InputError(
                f"the prompt ({prompt_len} tokens) plus max_new_tokens={max_new_tokens} exceeds the target's context "
                f"of {ctx} tokens; lower max_new_tokens to at most {ctx - prompt_len}"
            )
