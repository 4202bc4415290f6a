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

import functools
import json
import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from .draft_vocab import choose_draft_vocab, restrict_teacher
from .drafter import CONFIG_NAME, WEIGHTS_NAME, Drafter, DrafterConfig, read_weights
from .errors import InputError, UserError
from .images import cast_pixels
from .proposer import build_pairs
from .train_image import read_prompts, teach_image
from .target import target_forward

logger = logging.getLogger(__name__)

CHECKPOINT = "checkpoint"
DEPTH_WEIGHT = 0.8


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


# ---- turning a conversation into teacher signals -------------------------------------------------------------------


def encode_conversation(adapter, processor, conv) -> tuple[dict, Tensor]:
    """-> (the target's inputs for the whole conversation, [n] bool mask of assistant tokens).

    The mask comes from rendering growing prefixes with the target's own chat template: the tokens between "history +
    generation prompt" and "history + answer" are the answer. That works for any template, with no template markers."""
    from .images import load_images

    images = load_images(list(conv.images))
    msgs = list(conv.messages)

    def render(messages, gen_prompt):
        text = processor.apply_chat_template(adapter.chat(messages, len(images)), add_generation_prompt=gen_prompt,
                                             tokenize=False)
        if adapter.multimodal:
            return processor(text=text, images=images or None, return_tensors="pt")
        return processor(text, return_tensors="pt", add_special_tokens=False)

    full = render(msgs, False)
    ids = full["input_ids"][0]
    mask = torch.zeros(ids.numel(), dtype=torch.bool)
    for k, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        start = render(msgs[:k], True)["input_ids"].shape[1]
        end = render(msgs[: k + 1], False)["input_ids"].shape[1]
        if not torch.equal(render(msgs[: k + 1], False)["input_ids"][0], ids[:end]):
            raise InputError(f"line {conv.line_no}: the chat template does not render this conversation prefix-stably")
        mask[start:end] = True
    return dict(full), mask


@dataclass
class Example:
    tokens: Tensor  # [n]
    positions: Tensor  # [n] 1-D target positions
    features: list[Tensor]  # the drafter's feature layers, each [n, H], detached
    input_embeds: Tensor | None  # [n, H]
    teacher_logits: Tensor  # [n, V] the target's logits (row i predicts token i + 1)
    assistant: Tensor  # [n] bool
    n_images: int = 0


@torch.no_grad()
def teach(model, adapter, processor, conv, feature_layers: tuple[int, ...], want_embeds: bool, max_length: int) -> Example:
    inputs, mask = encode_conversation(adapter, processor, conv)
    dev = model.get_output_embeddings().weight.device
    inputs = {k: (v.to(dev) if torch.is_tensor(v) else v) for k, v in inputs.items()}
    cast_pixels(inputs, model.dtype)
    n = inputs["input_ids"].shape[1]
    if n > max_length:
        raise InputError(f"line {conv.line_no}: {n} tokens, more than --max-length {max_length}")
    out = target_forward(model, inputs, want_hidden=True, want_embeds=want_embeds, all_logits=True, use_cache=False)
    positions, _ = adapter.prompt_positions(model, inputs)
    return Example(
        tokens=inputs["input_ids"][0],
        positions=positions,
        features=[out.hidden_states[i][0] for i in feature_layers],
        input_embeds=None if out.input_embeds is None else out.input_embeds[0],
        teacher_logits=out.logits,
        assistant=mask.to(dev),
        n_images=adapter.count_images(inputs),
    )


_TENSOR_FIELDS = ("tokens", "positions", "input_embeds", "teacher_logits", "assistant")  # and the features list


def _example_to(ex: Example, device) -> Example:
    moved = {n: getattr(ex, n).to(device) for n in _TENSOR_FIELDS if getattr(ex, n) is not None}
    return replace(ex, features=[f.to(device) for f in ex.features], **moved)


def _example_bytes(ex: Example) -> int:
    tensors = [getattr(ex, n) for n in _TENSOR_FIELDS] + list(ex.features)
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


class TeacherCache:
    """`teach` for the training set (a list of Examples per conversation: one, or one per row of an image drafter),
    remembered per conversation (by its line in the data file) on the host until
    `budget_bytes` are used up; later conversations are recomputed every time.

    The target is frozen and `teach` is deterministic, so a cached Example is exactly what recomputing would give:
    training is unchanged, only faster (on the mini models the teacher is ~40 % of a step, and the build's drafters
    see each conversation ~5 times)."""

    def __init__(self, compute, budget_bytes: int, device) -> None:
        self.compute, self.budget, self.device = compute, budget_bytes, device
        self.used, self.hits = 0, 0
        self._store: dict[int, Example] = {}

    def __call__(self, conv) -> list[Example]:
        if conv.line_no in self._store:
            self.hits += 1
            return [_example_to(ex, self.device) for ex in self._store[conv.line_no]]
        exs = self.compute(conv)
        size = sum(_example_bytes(ex) for ex in exs)
        if self.used + size <= self.budget:
            self._store[conv.line_no] = [_example_to(ex, "cpu") for ex in exs]
            self.used += size
        return exs


# ---- the training objective ------------------------------------------------------------------------------------------


class DraftObjective(nn.Module):
    """Wraps the drafter so that one forward computes the whole unrolled loss (what DDP needs to sync gradients)."""

    def __init__(self, drafter: Drafter, ttt_steps: int, noise: float) -> None:
        super().__init__()
        self.drafter = drafter
        self.ttt_steps = ttt_steps
        self.noise = noise

    def _pairs(self, ex: Example, generator: torch.Generator | None):
        d = self.drafter
        fused = d.fuse_selected(ex.features)  # [n, H]
        feats = fused[:-1]
        if self.training and self.noise > 0:
            rms = feats.detach().pow(2).mean(-1, keepdim=True).sqrt()
            feats = feats + torch.randn(feats.shape, generator=generator, device=feats.device, dtype=feats.dtype) * rms * self.noise
        pairs, keep, _ = build_pairs(d, ex.tokens, ex.positions, feats, ex.input_embeds, ex.n_images)
        n = ex.tokens.numel()
        label_ok = torch.zeros_like(keep, dtype=torch.bool)
        inside = keep + 1 < n
        label_ok[inside] = ex.assistant[keep[inside] + 1]
        teacher = ex.teacher_logits[keep]
        return pairs, teacher, label_ok, fused[keep].detach()

    def unroll(self, tokens: Tensor, positions: Tensor, feats: Tensor, embeds: Tensor | None, vec: Tensor | None) -> list[Tensor]:
        """The training-time-test unroll over padded pairs [B, m]; returns the predicted features of every step [B, m, H].

        Query j at step s attends to the real prefix (step-0 keys of slots <= j - s) and to its own chain (the step-t
        key of slot j - s + t for t = 1..s): what a node at draft depth s + 1 sees in the proposer's KV cache."""
        d = self.drafter
        m, dev = tokens.shape[1], tokens.device
        causal = torch.ones(m, m, dtype=torch.bool, device=dev).tril()
        eye = torch.eye(m, dtype=torch.bool, device=dev)
        rows = torch.arange(m, device=dev)[:, None]
        keys, values, outs = [], [], []
        step_feats = feats
        for s in range(self.ttt_steps):
            x, residual = d.inputs(tokens, step_feats, embeds, vec)
            q, k, v = d.qkv(x, positions)
            keys.append(k)
            values.append(v)
            real = causal.roll(s, dims=0) & (rows >= s)  # key i <= j - s; rows j < s have no real prefix
            chain = [eye.roll(-(s - t), dims=1) & (rows >= s) for t in range(1, s + 1)]
            mask = torch.cat([real, *chain], dim=1)
            mask[:, -m:] |= eye  # every query sees itself, so no row is empty (rows j < s carry no loss)
            out = d.finish(residual, d.attend(q, torch.cat(keys, 2), torch.cat(values, 2), mask[None]))
            outs.append(out)
            # the next step's pair at slot j reads this step's prediction for slot j - 1
            step_feats = torch.cat([torch.zeros_like(out[:, :1]), out[:, :-1]], dim=1)
        return outs

    def forward(self, examples: list[Example], generator: torch.Generator | None = None) -> tuple[Tensor, dict]:
        d = self.drafter
        built = [self._pairs(ex, generator) for ex in examples]
        b, m = len(built), max(p.tokens.numel() for p, *_ in built)
        h = d.config.hidden_size
        dev = built[0][0].tokens.device
        dtype = d.q_proj.weight.dtype

        def pad(get, fill, shape=()):
            out = torch.full((b, m, *shape), fill, device=dev, dtype=get(0).dtype)
            for i in range(b):
                x = get(i)
                out[i, : x.shape[0]] = x
            return out

        tokens = pad(lambda i: built[i][0].tokens, 0)
        positions = pad(lambda i: built[i][0].positions, 0)
        feats = pad(lambda i: built[i][0].features.to(dtype), 0.0, (h,))
        has_embeds = built[0][0].embeds is not None  # image slots (ViSpec) or an image drafter's text prompt
        embeds = pad(lambda i: built[i][0].embeds.to(dtype), 0.0, (h,)) if has_embeds else None
        vec = None if d.vision is None else pad(lambda i: built[i][0].image_vec.to(dtype), 0.0, (h,))
        teacher = pad(lambda i: built[i][1].float(), 0.0, (built[0][1].shape[-1],))
        label_ok = pad(lambda i: built[i][2], False)
        if d.draft_token_ids is not None:  # a reduced head learns the target's distribution over its vocabulary
            teacher, label_ok = restrict_teacher(teacher, d.draft_token_ids, label_ok)
        reg_target = pad(lambda i: built[i][3].to(dtype), 0.0, (h,)) if d.config.fusion == "last" else None

        teacher_lp = torch.log_softmax(teacher, dim=-1)
        teacher_top = teacher.argmax(-1)
        total, weights, metrics = 0.0, 0.0, {}
        for s, out in enumerate(self.unroll(tokens, positions, feats, embeds, vec)):
            valid = label_ok.clone()
            valid[:, :s] = False
            logp = torch.log_softmax(d.logits(out).float(), dim=-1)
            ce = -(teacher_lp.exp() * logp).sum(-1)
            n_valid = valid.sum().clamp(min=1)
            loss = (ce * valid).sum() / n_valid
            if reg_target is not None:
                reg = F.smooth_l1_loss(out.float(), reg_target.float(), reduction="none").mean(-1)
                loss = loss + (reg * valid).sum() / n_valid
            w = DEPTH_WEIGHT**s
            total = total + w * loss
            weights += w
            metrics[f"loss_{s}"] = loss.detach()
            metrics[f"acc_{s}"] = ((logp.argmax(-1) == teacher_top) & valid).sum().float() / n_valid
            metrics[f"n_{s}"] = valid.sum()
        return total / weights, metrics


# ---- checkpoints: safetensors + JSON only, so resuming never unpickles --------------------------------------------------

# TrainConfig fields that do not change what training computes; every other one must match to resume a run exactly
_RESUME_FREE = ("save_every", "teacher_cache_gb")


@dataclass
class LoopState:
    """What, besides weights, optimizer and schedule, decides the rest of a run: the data order (the order generator
    as it was before this epoch's permutation, and how many of this epoch's batches are done) and every process's
    noise generator. A run resumed from it takes exactly the steps an uninterrupted run would have taken."""

    step: int = 0
    skipped: int = 0
    consumed: int = 0
    epoch_order: Tensor | None = None  # ByteTensor: torch.Generator state
    noise: list[Tensor] = field(default_factory=list)  # one generator state per process, by process index


def _save_checkpoint(path: Path, drafter: Drafter, optimizer, scheduler, loop: LoopState, cfg: TrainConfig,
                     scaler=None) -> None:
    tmp = path.with_name(path.name + ".tmp")
    drafter.save_pretrained(tmp)
    state = optimizer.state_dict()
    tensors = {f"{i}.{k}": v.detach().cpu().contiguous() for i, st in state["state"].items() for k, v in st.items()}
    tensors["loop.epoch_order"] = loop.epoch_order
    tensors.update({f"loop.noise.{rank}": g for rank, g in enumerate(loop.noise)})
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    meta = {"step": loop.step, "skipped": loop.skipped, "consumed": loop.consumed, "processes": len(loop.noise),
            "config": asdict(cfg), "param_groups": state["param_groups"], "scheduler": scheduler.state_dict(),
            "scaler": None if scaler is None else scaler.state_dict()}
    (tmp / "trainer_state.json").write_text(json.dumps(meta, default=float))
    if path.exists():
        shutil.rmtree(path)
    tmp.rename(path)  # a crash mid-save leaves the previous checkpoint intact


def _load_checkpoint(path: Path, drafter: Drafter, optimizer, scheduler, cfg: TrainConfig, world: int,
                     scaler=None) -> LoopState:
    """Restore a checkpoint into freshly built objects, refusing one that the same command did not write."""
    try:
        meta = json.loads((path / "trainer_state.json").read_text())
        saved = DrafterConfig.from_dict(json.loads((path / CONFIG_NAME).read_text()))
        old_cfg, step, skipped, consumed = meta["config"], meta["step"], meta["skipped"], meta["consumed"]
    except (OSError, ValueError, TypeError, KeyError) as e:  # KeyError: a checkpoint of an older mmspec
        raise InputError(f"cannot resume from {path} ({type(e).__name__}: {e}); delete it or use a new --out") from None
    changed = [f"{k}={old_cfg.get(k)!r} (now {v!r})" for k, v in asdict(cfg).items()
               if k not in _RESUME_FREE and old_cfg.get(k) != v]
    changed += [f"{k}={getattr(saved, k)!r} (now {v!r})" for k, v in asdict(drafter.config).items()
                if k != "extra" and getattr(saved, k) != v]
    if meta.get("processes") != world:
        changed.append(f"{meta.get('processes')} processes (now {world})")
    if changed:
        raise InputError(f"checkpoint {path} was written by a different run: {', '.join(changed)}; rerun the same "
                         f"command to resume it, or use a new --out")
    try:
        drafter.load_state_dict(read_weights(path / WEIGHTS_NAME))  # strict: every tensor, nothing else
    except RuntimeError as e:  # missing, unexpected or misshapen tensors
        raise InputError(f"the weights in checkpoint {path} do not fit this drafter: {' '.join(str(e).split())}") from None
    tensors = read_weights(path / "optimizer.safetensors")
    loop = LoopState(step=int(step), skipped=int(skipped), consumed=int(consumed),
                     epoch_order=tensors.pop("loop.epoch_order"),
                     noise=[tensors.pop(f"loop.noise.{rank}") for rank in range(world)])
    state: dict[int, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    scheduler.load_state_dict(meta["scheduler"])
    if scaler is not None and meta.get("scaler"):
        scaler.load_state_dict(meta["scaler"])
    return loop


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


@torch.no_grad()
def evaluate(objective: DraftObjective, batches: list[list[Example]]) -> dict:
    """Held-out loss and per-depth top-1 agreement with the target (the greedy acceptance rate at each draft depth)."""
    objective.eval()
    sums: dict[str, float] = {}
    for exs in batches:
        _, m = objective(exs)
        for s in range(objective.ttt_steps):
            n = float(m[f"n_{s}"])
            sums[f"acc_{s}"] = sums.get(f"acc_{s}", 0.0) + float(m[f"acc_{s}"]) * n
            sums[f"loss_{s}"] = sums.get(f"loss_{s}", 0.0) + float(m[f"loss_{s}"]) * n
            sums[f"n_{s}"] = sums.get(f"n_{s}", 0.0) + n
    objective.train()
    out = {}
    for s in range(objective.ttt_steps):
        n = max(sums.get(f"n_{s}", 0.0), 1.0)
        out[f"depth{s + 1}_acc"] = sums.get(f"acc_{s}", 0.0) / n
        out[f"depth{s + 1}_loss"] = sums.get(f"loss_{s}", 0.0) / n
    return out


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
        _save_checkpoint(ckpt, t.drafter, t.optimizer, t.scheduler, loop, t.cfg, t.scaler)
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
        loop = _load_checkpoint(ckpt, drafter, optimizer, scheduler, cfg, world, t.scaler)
        t.noise.set_state(loop.noise[accelerator.process_index])
        logger.info("resumed from %s at step %d", ckpt, loop.step)
    want_embeds = drafter.vision is not None

    def teach_one(conv) -> list[Example]:
        if adapter.generates_images:  # one Example per drafter row
            return teach_image(model, adapter, processor, conv, drafter.config.feature_layers, cfg.guidance_scale,
                               cfg.seed, cfg.draft_rows)
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
