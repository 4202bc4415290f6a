"""Drafter training: the frozen target is the teacher, computed on the fly; one process or data-parallel via accelerate.
Its signals for a conversation never change, so they are kept in host memory up to `teacher_cache_gb` and reused by
later epochs (EAGLE precomputes them to disk for the same reason).

Method (EAGLE-3 with the ViSpec adaptor):
- Soft cross-entropy against the target's next-token distribution at every assistant position, plus, for
  fusion="last", a smooth-L1 regression of the target's feature (EAGLE-1/2 need the feature itself; EAGLE-3's fused
  space is learned, so it is trained through the token loss only).
- Training-time test (EAGLE-3): the drafter is unrolled on its own outputs for `ttt_steps` steps. At step s the pair at
  slot j reads the feature the drafter predicted at step s-1 for slot j-1 and attends to the real prefix up to j-s plus
  its own chain of predicted slots, exactly what it sees at draft depth s + 1. Loss weight 0.8**s. This also covers
  ViSpec's anti-shortcut self-rollout: the drafter cannot lean on copying target features it will not have.
- Gaussian noise on the target features (EAGLE), scaled to the feature's RMS.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
import functools
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .draft_vocab import choose_draft_vocab
from .drafter import Drafter
from .errors import InputError, UserError
from .train_checkpoint import LoopState, load_checkpoint, save_checkpoint
from .train_examples import Example, TeacherCache, encode_conversation, teach
from .train_image import drawer_for, read_prompts, teach_image
from .train_objective import DraftObjective, evaluate

logger = logging.getLogger(__name__)

CHECKPOINT = "checkpoint"


@dataclass(frozen=True)
class TrainConfig:
    vision_adaptor: bool = True
    fusion: str = "multi_layer"
    num_queries: int = 2
    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 3e-4
    weight_decay: float = 0.0
    warmup_steps: int = 50
    seed: int = 0
    ttt_steps: int = 3
    noise: float = 0.05
    eval_fraction: float = 0.05
    mixed_precision: str = "no"
    save_every: int = 200
    max_length: int = 1024
    teacher_cache_gb: float = 2.0  # host memory for reused teacher signals; 0 recomputes them every time
    guidance_scale: float = 5.0  # image targets: the CFG scale the target draws its training images with
    draft_rows: int = 1  # image targets: 2 trains on both CFG rows for drafting from combined logits (LANTERN)
    intermediate_size: int | None = None  # the drafter's MLP width (default: the target's)
    num_heads: int | None = None  # the drafter's attention heads (default: the target's)
    draft_vocab: int | None = None  # a reduced draft vocabulary: the N most frequent learned tokens (EAGLE-3)

    def __post_init__(self) -> None:
        if not self.teacher_cache_gb >= 0:  # also rejects NaN
            raise InputError(f"teacher_cache_gb must be >= 0 (0 turns the cache off), got {self.teacher_cache_gb!r}")


def _epoch_batches(order_gen: torch.Generator, n: int, rank: int, world: int, batch_size: int) -> list[list[int]]:
    """This process's batches of one epoch. A strided share of one permutation per process (data-parallel), cut to the
    same length everywhere: every process must take the same number of steps, or the gradient all-reduce would wait
    forever."""
    perm = torch.randperm(n, generator=order_gen).tolist()
    mine = perm[rank::world][: n // world]
    return [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]


# ---- the loop ------------------------------------------------------------------------------------------------------------


def _split(convs: list, fraction: float, seed: int) -> tuple[list, list]:
    if len(convs) < 2 or fraction <= 0:
        return convs, []
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(convs), generator=g).tolist()
    n_eval = max(1, int(round(len(convs) * fraction)))
    return [convs[i] for i in sorted(order[n_eval:])], [convs[i] for i in sorted(order[:n_eval])]


class OutputExistsError(UserError, FileExistsError):
    """--out holds something other than a checkpoint of this run."""


@dataclass
class _Training:
    """The objects one training run steps together."""

    cfg: TrainConfig
    accelerator: object
    drafter: Drafter
    objective: nn.Module  # DraftObjective, wrapped by accelerate (DDP) when data-parallel
    optimizer: object
    scheduler: object
    noise: torch.Generator  # this process's feature-noise generator
    order: torch.Generator  # the data order, the same on every process

    @property
    def scaler(self):
        return getattr(self.accelerator, "scaler", None)  # fp16's GradScaler, else None


def _load_inputs(target: str, data, cfg: TrainConfig, device):
    """-> (train conversations, held-out conversations, skip report, model, processor, adapter), with the checks
    that need both the data and the target."""
    from .data_tools.jsonl import SkipReport, read_conversations
    from .pipeline import load_target

    model, processor, adapter = load_target(target, device=device, dtype=torch.float32)
    for p in model.parameters():
        p.requires_grad_(False)
    if adapter.generates_images:  # prompt lines; the target draws its own images (train_image)
        lines = read_prompts(data)
        if not lines:
            raise InputError(f"no prompt lines in {data}")
        return (*_split(lines, cfg.eval_fraction, cfg.seed), SkipReport(), model, processor, adapter)
    convs, report = read_conversations(data)
    if not convs:
        raise InputError(f"no usable conversations in {data} (skipped: {report.counts})")
    train_set, eval_set = _split(convs, cfg.eval_fraction, cfg.seed)
    if adapter.multimodal is False and cfg.vision_adaptor:
        raise InputError("--vision-adaptor needs a vision-language target; this one is text-only (use --no-vision-adaptor)")
    if not adapter.multimodal and any(c.images for c in convs):
        n = sum(1 for c in convs if c.images)
        raise InputError(f"{n} conversations in {data} have images, but target {target!r} is a text-only model")
    if cfg.vision_adaptor and not any(c.images for c in convs):
        logger.warning("--vision-adaptor with a data set that has no images: the adaptor will not learn anything")
    return train_set, eval_set, report, model, processor, adapter


def _lr_lambda(cfg: TrainConfig, total_steps: int):
    """Linear warm-up, then cosine decay to a tenth of the peak."""

    def lr_at(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return lr_at


def _run_steps(t: _Training, loop: LoopState, train_set: list, examples, total_steps: int, ckpt: Path) -> None:
    """Optimizer steps until total_steps, checkpointing every cfg.save_every; `loop` is advanced in place."""
    cfg, acc = t.cfg, t.accelerator
    world = acc.num_processes
    bar = tqdm(total=total_steps, initial=loop.step, disable=not acc.is_main_process, desc="train-drafter")
    t.order.set_state(loop.epoch_order)
    epoch_batches = _epoch_batches(t.order, len(train_set), acc.process_index, world, cfg.batch_size)[loop.consumed:]
    per_epoch = math.ceil((len(train_set) // world) / cfg.batch_size)
    micro = 0  # checkpoints fall on optimizer steps, so a resumed run starts at a step boundary too
    failed = 0  # batches in a row whose every example failed
    while loop.step < total_steps:
        if not epoch_batches:
            loop.epoch_order, loop.consumed = t.order.get_state(), 0
            epoch_batches = _epoch_batches(t.order, len(train_set), acc.process_index, world, cfg.batch_size)
        idx = epoch_batches.pop(0)
        loop.consumed += 1
        exs = examples([train_set[i] for i in idx])
        if not exs:
            failed += 1
            if world > 1 or failed > per_epoch:
                raise InputError(f"every example of {failed} batch(es) in a row failed (last batch: lines "
                                 f"{[train_set[i].line_no for i in idx]}); fix the data: a data-parallel run cannot "
                                 f"skip a step on one process, and a whole epoch of failures would never end")
            continue
        failed = 0
        with acc.accumulate(t.objective):
            loss, metrics = t.objective(exs, t.noise)
            acc.backward(loss)
            if acc.sync_gradients:
                acc.clip_grad_norm_(t.objective.parameters(), 1.0)
            t.optimizer.step()
            t.optimizer.zero_grad()
            if acc.sync_gradients:
                t.scheduler.step()
        micro += 1
        if micro % cfg.grad_accum:
            continue
        loop.step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{float(metrics['acc_0']):.2f}")
        if loop.step % cfg.save_every == 0 and loop.step < total_steps:
            _checkpoint(t, loop, ckpt)
    bar.close()


def _checkpoint(t: _Training, loop: LoopState, ckpt: Path) -> None:
    from accelerate.utils import gather_object

    acc = t.accelerator
    acc.wait_for_everyone()
    state = t.noise.get_state()
    loop.noise = gather_object([state]) if acc.num_processes > 1 else [state]  # every process's noise state
    if acc.is_main_process:
        save_checkpoint(ckpt, t.drafter, t.optimizer, t.scheduler, loop, asdict(t.cfg), t.scaler)
    acc.wait_for_everyone()


def _start(out: Path, ckpt: Path, cfg: TrainConfig, device: str | None):
    """The accelerator, after checking --out (empty, or holding a checkpoint to resume) and creating it now, not after
    hours of training."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not ckpt.is_dir():
        raise OutputExistsError(f"output {str(out)!r} exists and is not empty (or not a directory), and holds no "
                                f"checkpoint to resume; choose a new --out")
    accelerator = Accelerator(
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.grad_accum,
        # accelerate only runs data-parallel on CPUs (gloo) when told to use the CPU
        cpu=device == "cpu" or (device is None and not torch.cuda.is_available()),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )
    if accelerator.is_main_process:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise InputError(f"cannot create --out {str(out)!r}: {e.strerror or e}") from None
    return accelerator


def _new_drafter(target: str, model, adapter, cfg: TrainConfig, vocab_ids=None) -> Drafter:
    if cfg.draft_rows != 1 and not adapter.generates_images:
        raise InputError("--draft-rows 2 is for AR image generators (both CFG rows); a VLM drafter reads one row")
    drafter = Drafter.for_target(model, vision_adaptor=cfg.vision_adaptor, num_queries=cfg.num_queries, fusion=cfg.fusion,
                                 draft_rows=cfg.draft_rows, intermediate_size=cfg.intermediate_size,
                                 num_heads=cfg.num_heads, draft_vocab=vocab_ids)
    drafter.config.extra["target"] = str(target)  # lets export-drafter find the LM head it shares
    return drafter


def _draft_vocab(cfg: TrainConfig, train_set: list, model, adapter, processor):
    """--draft-vocab N -> [N] target ids (the most frequent learned tokens of the training set), or None."""
    if cfg.draft_vocab is None:
        return None
    if adapter.generates_images:
        raise InputError("--draft-vocab applies to text drafters; an image drafter predicts the whole codebook")
    return choose_draft_vocab(cfg.draft_vocab, train_set, functools.partial(encode_conversation, adapter, processor),
                              model.config.get_text_config().vocab_size)


def train_drafter(target: str, data: str | Path, out: str | Path, cfg: TrainConfig = TrainConfig(), *,
                  device: str | None = None) -> dict:
    """Train a drafter for `target` on JSONL conversations; writes a Drafter directory to `out` (main process only).
    Rerunning the same call after an interruption resumes from the last checkpoint in `out` and trains exactly the
    weights the uninterrupted run would have."""
    out = Path(out)
    ckpt = out / CHECKPOINT
    accelerator = _start(out, ckpt, cfg, device)
    torch.manual_seed(cfg.seed)
    train_set, eval_set, report, model, processor, adapter = _load_inputs(target, data, cfg, accelerator.device)
    vocab_ids = _draft_vocab(cfg, train_set, model, adapter, processor)
    drafter = _new_drafter(target, model, adapter, cfg, vocab_ids).to(accelerator.device)
    objective = DraftObjective(drafter, cfg.ttt_steps, cfg.noise)
    optimizer = torch.optim.AdamW([p for p in drafter.parameters() if p.requires_grad], lr=cfg.lr,
                                  weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    world = accelerator.num_processes
    if len(train_set) < world:
        raise InputError(f"{len(train_set)} training conversations cannot feed {world} processes")
    per_epoch = math.ceil((len(train_set) // world) / cfg.batch_size)
    total_steps = cfg.max_steps or max(1, per_epoch * cfg.epochs // cfg.grad_accum)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg, total_steps))
    objective, optimizer = accelerator.prepare(objective, optimizer)
    t = _Training(cfg, accelerator, drafter, objective, optimizer, scheduler,
                  noise=torch.Generator(device=accelerator.device).manual_seed(cfg.seed + accelerator.process_index),
                  order=torch.Generator().manual_seed(cfg.seed))
    loop = LoopState(epoch_order=t.order.get_state())
    if ckpt.is_dir():
        loop = load_checkpoint(ckpt, drafter, optimizer, scheduler, asdict(cfg), world, t.scaler)
        t.noise.set_state(loop.noise[accelerator.process_index])
        logger.info("resumed from %s at step %d", ckpt, loop.step)
    want_embeds = drafter.vision is not None

    drawer = drawer_for(model, adapter, processor) if adapter.generates_images else None

    def teach_one(conv) -> list[Example]:
        if drawer is not None:  # one Example per drafter row
            return teach_image(drawer, conv, drafter.config.feature_layers, cfg.guidance_scale, cfg.seed,
                               cfg.draft_rows)
        return [teach(model, adapter, processor, conv, drafter.config.feature_layers, want_embeds, cfg.max_length)]

    cache = TeacherCache(teach_one, int(cfg.teacher_cache_gb * 2**30), accelerator.device)

    def batch_examples(items, teacher=cache):
        """One bad example (too long, an image the processor refuses) must not end a long run; _run_steps stops when
        whole batches keep failing, so a bug that fails every example still surfaces."""
        exs = []
        for conv in items:
            try:
                exs.extend(teacher(conv))
            except (UserError, ValueError, OSError) as e:
                loop.skipped += 1
                logger.warning("skipping %s", e)
        return exs

    t0 = time.perf_counter()
    _run_steps(t, loop, train_set, batch_examples, total_steps, ckpt)
    accelerator.wait_for_everyone()
    train_s = time.perf_counter() - t0
    held_out = {}
    if eval_set and accelerator.is_main_process:
        batches = [batch_examples(eval_set[i : i + cfg.batch_size], teach_one)
                   for i in range(0, len(eval_set), cfg.batch_size)]
        held_out = evaluate(accelerator.unwrap_model(objective), [b for b in batches if b])
        for k, v in held_out.items():
            logger.info("held-out %s = %.4f", k, v)
    if cache.hits:
        logger.info("teacher cache: %d reuses, %.2f GB held", cache.hits, cache.used / 2**30)
    metrics_out = {"steps": loop.step, "train_s": train_s, "teacher_cache_reuses": cache.hits, "processes": world,
                   "train_conversations": len(train_set),
                   "eval_conversations": len(eval_set), "skipped_lines": report.counts, "skipped_examples": loop.skipped,
                   "held_out": held_out, "config": asdict(cfg), "target": str(target)}
    if accelerator.is_main_process:
        drafter.save_pretrained(out)
        (out / "training_metrics.json").write_text(json.dumps(metrics_out, indent=2) + "\n")
        if ckpt.is_dir():
            shutil.rmtree(ckpt)
    accelerator.wait_for_everyone()
    return metrics_out


def train_from_args(args) -> dict:
    cfg = TrainConfig(
        vision_adaptor=args.vision_adaptor, fusion=args.fusion, num_queries=args.num_queries, epochs=args.epochs,
        max_steps=args.max_steps, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr, seed=args.seed,
        ttt_steps=args.ttt_steps, eval_fraction=args.eval_fraction, mixed_precision=args.mixed_precision,
        save_every=args.save_every, max_length=args.max_length, teacher_cache_gb=args.teacher_cache_gb,
        guidance_scale=args.guidance_scale, draft_rows=args.draft_rows, intermediate_size=args.intermediate_size,
        num_heads=args.num_heads, draft_vocab=getattr(args, "draft_vocab", None),
    )
    metrics = train_drafter(args.target, args.data, args.out, cfg, device=getattr(args, "device", None))
    held = metrics.get("held_out") or {}
    if held:
        print("held-out acceptance by depth: " + "  ".join(f"d{k[5]}={v:.3f}" for k, v in held.items() if k.endswith("_acc")))
    return metrics
