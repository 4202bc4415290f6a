"""Build and train ``mini-vlm``, the built-in target model, from scratch on shapes-world conversations.

mini-vlm is an ordinary ``LlavaForConditionalGeneration`` (a small CLIP vision tower, the LLaVA-1.5 two-layer MLP
projector and a Llama decoder) with its ``LlavaProcessor``, so every mmspec code path that serves a real LLaVA serves
it unchanged. It is trained like LLaVA's instruction tuning (Liu et al., 2023, "Visual Instruction Tuning"), except
that every part, vision tower included, learns from scratch: next-token loss on the assistant tokens.

Two stages: a vision warm-up (the tower and projector alone, on per-cell and per-patch scene labels, see
``VisionProbe``) stands in for the pretrained CLIP that LLaVA starts from; then the joint run. Its mix balances the
long ``describe`` task (what the speculative benchmark decodes) with the short questions that teach the decoder to
look things up in the image.

All randomness comes from ``torch.manual_seed`` and ``torch.Generator`` objects seeded by the caller.

CLI: ``python -m mmspec.data_tools.train_target --data-dir DIR --out DIR [--vision-warmup-steps N] [--steps N]
[--batch-size N] [--size mini|micro] [--seed S]``
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)

from mmspec.errors import InputError
from mmspec.hardware import native_bf16, training_device

from .shapes_world import SHAPES, SIZE_PX  # noqa: F401
from .target_data import (  # noqa: F401  (the data helpers stay importable from here)
    EncodedSet,
    length_grouped_batches,
    load_scene_images,
    image_token_count,
    cell_labels,
    chat_messages,
    collate,
    encode_example,
    encode_set,
    load_records,
    patch_cells,
    patch_labels,
)
from .target_eval import evaluate_target, grade, image_spread  # noqa: F401
from .target_vision import VisionProbe, tower_image_tokens, vision_warmup  # noqa: F401
from .tokenizer import IMAGE

logger = logging.getLogger(__name__)

NUM_THREADS = 2


@dataclass(frozen=True)
class TargetSize:
    """Shape of a mini-vlm: a CLIP vision tower on ``image_px`` square inputs and a Llama decoder."""

    vision_hidden: int
    vision_layers: int
    vision_heads: int
    patch: int  # image tokens per image = (64 / patch) ** 2
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    max_positions: int = 1024
    image_px: int = SIZE_PX  # the processor resizes the 64-px scenes to this


SIZES = {
    # ~15 M parameters: one decode step costs several ms on a 2-core CPU, far above framework overhead, so a drafter
    # that saves target forwards saves real time. 60-px inputs in 10-px patches: 36 image tokens, and every grid cell
    # is exactly 2x2 patches, so a shape looks the same to the ViT in every cell (with 8-px patches on 64 px each
    # cell cuts its objects differently, and a pilot learned shapes about half as fast). Few image tokens also keep
    # the decoder's sequences short: a from-scratch decoder learns to look things up over thousands of steps.
    "mini": TargetSize(vision_hidden=256, vision_layers=4, vision_heads=4, patch=10,
                       hidden=384, layers=6, heads=6, kv_heads=6, intermediate=1024, image_px=60),
    # The built-in mini-vlm since issue #23: the same tower and 36 image tokens, a decoder 24 blocks deep and 256
    # wide (~25 M parameters). Real targets have 28-32 layers; a one-layer drafter should cost a small share of a
    # target step, as it does beside them, or the speed figures measure the drafter's cost, not speculation.
    "deep": TargetSize(vision_hidden=256, vision_layers=4, vision_heads=4, patch=10,
                       hidden=256, layers=24, heads=4, kv_heads=4, intermediate=768, image_px=60),
    # ~2 M parameters, 2 decoder layers: mini-vlm-assistant, the draft model of transformers' assisted generation.
    # It reads the target's input ids as they are, so it keeps the target's 36 image tokens (same patch size).
    "assistant": TargetSize(vision_hidden=128, vision_layers=2, vision_heads=2, patch=10,
                            hidden=256, layers=2, heads=4, kv_heads=4, intermediate=512, image_px=60),
    # A few hundred thousand parameters and 16 image tokens: for tests of the build path, trains in seconds.
    "micro": TargetSize(vision_hidden=32, vision_layers=1, vision_heads=2, patch=16,
                        hidden=64, layers=2, heads=2, kv_heads=1, intermediate=128),
}

# Share of each task in the generated training data (make_dataset draws tasks uniformly from a list, so repeats
# weight it): describe, count and colour 20 % each, shape and position 13 %, yes/no and compare 7 %. Short
# questions bind one word to one place in the image, the lesson a decoder from scratch learns slowest; a run
# with describe at 42 % learned the templates but answered colour questions right only 59 % of the time.
TRAIN_TASK_WEIGHTS = {"describe": 3, "count": 3, "colour": 3, "shape": 2, "position": 2, "yesno": 1, "compare": 1}
TRAIN_TASKS = tuple(t for t, w in TRAIN_TASK_WEIGHTS.items() for _ in range(w))


# ---------------------------------------------------------------------------------------------------------- build
def build_target(tokenizer_dir: str | Path, out_dir: str | Path, size: str = "mini", seed: int = 0) -> Path:
    """Create an untrained mini-vlm (model + processor) with the tokenizer in ``tokenizer_dir``; save to ``out_dir``."""
    if size not in SIZES:
        raise InputError(f"unknown size {size!r}; choose from {', '.join(SIZES)}")
    s = SIZES[size]
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE)
    n_image_tokens = (s.image_px // s.patch) ** 2
    vision = CLIPVisionConfig(hidden_size=s.vision_hidden, intermediate_size=4 * s.vision_hidden,
                              num_hidden_layers=s.vision_layers, num_attention_heads=s.vision_heads,
                              image_size=s.image_px, patch_size=s.patch, projection_dim=s.vision_hidden)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=s.hidden, intermediate_size=s.intermediate,
                       num_hidden_layers=s.layers, num_attention_heads=s.heads, num_key_value_heads=s.kv_heads,
                       max_position_embeddings=s.max_positions, rms_norm_eps=1e-5, tie_word_embeddings=False,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
    # vision_feature_layer=-1: trained from scratch, the last layer is as good as any, and -2 would run a layer whose
    # output nobody reads. "default" drops the CLS token, leaving exactly the patch tokens.
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_token_id,
                         image_seq_length=n_image_tokens, vision_feature_layer=-1,
                         vision_feature_select_strategy="default", projector_hidden_act="gelu",
                         tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration._from_config(config, attn_implementation="sdpa")
    gc = model.generation_config
    gc.bos_token_id, gc.eos_token_id, gc.pad_token_id = (tokenizer.bos_token_id, tokenizer.eos_token_id,
                                                         tokenizer.pad_token_id)
    gc.do_sample, gc.max_new_tokens = False, 256
    # Shortest edge to image_px, then a centre crop: a shapes-world scene is scaled as a whole, any other image fits.
    image_processor = CLIPImageProcessor(size={"shortest_edge": s.image_px},
                                         crop_size={"height": s.image_px, "width": s.image_px})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=s.patch,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=tokenizer.chat_template)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir))
    processor.save_pretrained(str(out_dir))
    logger.info("built %s mini-vlm: %.2f M parameters, %d image tokens -> %s", size,
                sum(p.numel() for p in model.parameters()) / 1e6, n_image_tokens, out_dir)
    return out_dir


def answer_loss(logits: torch.Tensor, labels: torch.Tensor, per_example: bool) -> torch.Tensor:
    """Next-token cross-entropy over the labelled (assistant) tokens: logits [B, T, V], labels [B, T] (-100 = none).

    ``per_example``: the mean over each row's tokens, then over the rows that have any; otherwise over all tokens."""
    token = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100,
                            reduction="none").view(labels.shape)
    mask = (labels != -100).float()
    if not per_example:
        return (token * mask).sum() / mask.sum().clamp_min(1)
    n = mask.sum(1)
    rows = n > 0
    return ((token * mask).sum(1)[rows] / n[rows]).mean()


# ---------------------------------------------------------------------------------------------------------- train
class Clock:
    """Where a run is in its schedule: the share of its ``steps`` done or, with ``minutes``, of its wall-clock budget,
    whichever is further (a run on an unknown machine ends on time with its schedule complete). Linear warmup over
    ``warmup`` of the run, then cosine decay to a tenth of ``lr``."""

    def __init__(self, lr: float, steps: int, warmup: float, minutes: float | None = None) -> None:
        self.lr, self.steps, self.warmup, self.minutes, self.t0 = lr, steps, max(warmup, 1e-9), minutes, time.time()

    def progress(self, step: int) -> float:
        p = step / self.steps
        if self.minutes:
            p = max(p, (time.time() - self.t0) / (60 * self.minutes))
        return min(1.0, p)

    def lr_at(self, progress: float) -> float:
        if progress < self.warmup:
            return self.lr * min(1.0, max(progress, 1 / self.steps) / self.warmup)
        t = (progress - self.warmup) / max(1e-9, 1 - self.warmup)
        return self.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


@dataclass
class _Run:
    """What one training stage holds while it runs (mutable: the loop advances it)."""
    model: torch.nn.Module
    processor: object
    data: EncodedSet
    probe: VisionProbe
    device: torch.device
    bf16: bool
    grid: int


def _load_run(model_dir, data_jsonl, device: torch.device, bf16: bool | None) -> _Run:
    model = AutoModelForImageTextToText.from_pretrained(str(model_dir), dtype=torch.float32,
                                                        attn_implementation="sdpa").to(device)
    processor = AutoProcessor.from_pretrained(str(model_dir))
    records = load_records(data_jsonl)
    if not records:
        raise InputError(f"{data_jsonl} holds no conversations")
    t0 = time.time()
    data = encode_set(processor, records)
    logger.info("encoded %d conversations and %d images in %.1f s", len(records), len(data.pixels), time.time() - t0)
    grid = int(round(image_token_count(processor) ** 0.5))
    probe = VisionProbe(model.config.text_config.hidden_size, grid).to(device)
    return _Run(model, processor, data.to(device) if device.type == "cuda" else data, probe, device,
                native_bf16(device) if bf16 is None else bf16, grid)


def _optimizer(run: _Run, lr: float, weight_decay: float) -> tuple[torch.optim.Optimizer, list]:
    trainable = [(n, p) for n, p in run.model.named_parameters() if p.requires_grad]
    decay = [p for n, p in trainable if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in trainable if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay + list(run.probe.parameters()), "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=run.device.type == "cuda")
    return opt, decay + no_decay


def _train_step(run: _Run, batch: dict, captured: dict, per_example_loss: bool, aux_weight: float):
    """Forward and backward of one batch: (answer loss, probe shape accuracy or None), both unread tensors."""
    with torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=run.bf16):
        logits = run.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           pixel_values=batch["pixel_values"]).logits
    loss = answer_loss(logits[:, :-1], batch["labels"][:, 1:], per_example_loss)
    total, shape_acc = loss, None
    if aux_weight > 0 and batch["scene_labels"] is not None:
        aux, stats = run.probe(captured["img"].float(), *batch["scene_labels"])
        total, shape_acc = loss + aux_weight * aux, stats["shape"]
    total.backward()
    return loss.detach(), shape_acc


def _loop(run: _Run, opt, params, clock: Clock, *, batch_size: int, g: torch.Generator, per_example_loss: bool,
          aux_weight: float, clip_norm: float, log_every: int, monitor: list[dict], monitor_every: int) -> dict:
    """The joint stage's steps until the clock runs out: {"steps", "losses", "monitor", "tokens"}."""
    captured: dict[str, torch.Tensor] = {}
    hook = run.model.model.multi_modal_projector.register_forward_hook(
        lambda _m, _i, out: captured.__setitem__("img", out))
    spread_pixels = run.data.pixels[:16].to(run.device).float()
    pad, lengths, batches = run.processor.tokenizer.pad_token_id, run.data.lengths, []
    losses, monitored, tokens, running, t0, step = [], [], 0, None, time.time(), 0
    bar = tqdm(total=clock.steps, desc="train mini-vlm", unit="step", disable=None)
    run.model.train()
    while clock.progress(step) < 1:
        step += 1
        batches = batches or length_grouped_batches(lengths, batch_size, g)
        batch = collate(run.data, batches.pop(), run.grid, pad, run.device)
        lr = clock.lr_at(clock.progress(step - 1))
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad(set_to_none=True)
        loss, shape_acc = _train_step(run, batch, captured, per_example_loss, aux_weight)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, clip_norm)
        opt.step()
        tokens += (batch["labels"] != -100).sum()
        running = loss if running is None else 0.9 * running + 0.1 * loss
        bar.update()
        last = clock.progress(step) >= 1
        if step == 1 or step % log_every == 0 or last:
            spread = image_spread(run.model, spread_pixels)
            losses.append({"step": step, "loss": round(loss.item(), 5), "smoothed": round(running.item(), 5),
                           "grad_norm": round(float(grad_norm), 4), "image_spread": round(spread, 4),
                           "lr": lr, "elapsed_s": round(time.time() - t0, 1)})
            logger.info("step %d loss %.4f (smoothed %.4f) grad %.3f lr %.2e image spread %.3f probe shapes %.2f "
                        "%.1fs", step, loss.item(), running.item(), float(grad_norm), lr, spread,
                        float("nan") if shape_acc is None else float(shape_acc), time.time() - t0)
        if monitor and (step % monitor_every == 0 or last):
            scores, _ = grade(run.model, run.processor, monitor, 16 if run.device.type == "cpu" else len(monitor))
            monitored.append({"step": step, **scores})
            logger.info("step %d held-out answers: %s", step, scores)
    bar.close()
    hook.remove()
    return {"steps": step, "losses": losses, "monitor": monitored, "tokens": int(tokens)}


def _monitor_records(path: str | Path, n_short: int, n_describe: int) -> list[dict]:
    """The first ``n_short`` count and colour questions and the first ``n_describe`` descriptions of ``path``: a
    stage that lifts short answers can cost descriptions (the deep model's second GPU shot), and a monitor blind to
    them cannot tell (docs/mini-models.md)."""
    records = load_records(path)
    short = [r for r in records if r["task"] in ("count", "colour")][:n_short]
    return short + [r for r in records if r["task"] == "describe"][:n_describe]


def train_target(model_dir: str | Path, data_jsonl: str | Path, out_dir: str | Path, *, steps: int,
                 batch_size: int = 32, lr: float = 1e-3, seed: int = 0, log_every: int = 10,
                 eval_data: str | Path | None = None, warmup: float = 0.05, weight_decay: float = 0.05,
                 clip_norm: float = 1.0, bf16: bool | None = None, aux_weight: float = 1.0,
                 vision_warmup_steps: int = 0, freeze_vision_tower: bool = False,
                 monitor_data: str | Path | None = None, monitor_every: int = 0, monitor_n: int = 96,
                 monitor_describe: int = 0, per_example_loss: bool = False, minutes: float | None = None,
                 device: str | torch.device | None = None) -> dict:
    """Train the model in ``model_dir`` on the assistant tokens of ``data_jsonl``; save model + processor to ``out_dir``.

    ``vision_warmup_steps`` > 0 first runs :func:`vision_warmup` (batches twice ``batch_size``). The joint stage then
    trains the rest (the vision tower too unless ``freeze_vision_tower``): next-token loss on the assistant tokens
    plus ``aux_weight`` times the probe loss (shapes-world records only). Freezing the warmed-up tower is LLaVA's
    recipe; a pilot that kept training it saw its shape accuracy fall from 1.0 to ~0.85 under the first gradients
    of the random decoder. AdamW, schedule and stopping by :class:`Clock` (``steps``, or ``minutes`` of wall clock
    if that runs out first); gradients clipped to ``clip_norm``. ``bf16``: bfloat16 autocast (fp32 master weights);
    None turns it on where the device has native bfloat16. ``device``: default cuda when available.
    ``monitor_data``/``monitor_every``: grade greedy answers to the first ``monitor_n`` count and colour questions
    of that JSONL, and its first ``monitor_describe`` descriptions (graded whole), every so many steps.
    ``per_example_loss``: every answer weighs the same (``answer_loss``) rather than every token, which lets a long
    description outweigh a one-word colour answer some twentyfold.
    Returns metrics (losses, time, and ``eval`` when ``eval_data``).
    """
    if steps <= 0 or batch_size <= 0 or lr <= 0 or vision_warmup_steps < 0:
        raise InputError(f"steps, batch_size and lr must be positive and vision_warmup_steps >= 0; got {steps}, "
                         f"{batch_size}, {lr}, {vision_warmup_steps}")
    device = training_device(str(device) if device is not None else None)
    if device.type == "cpu":
        torch.set_num_threads(NUM_THREADS)
    # Optimizer states of rarely-updated weights decay into subnormal floats, which x86 CPUs compute on in
    # microcode at a small fraction of normal speed; flushing them to zero changes nothing measurable.
    torch.set_flush_denormal(True)
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    run = _load_run(model_dir, data_jsonl, device, bf16)
    monitor = _monitor_records(monitor_data, monitor_n, monitor_describe) \
        if monitor_data is not None and monitor_every > 0 else []
    t_start = time.time()
    warm_log = vision_warmup(run.model, run.data, run.probe, steps=vision_warmup_steps, batch_size=2 * batch_size,
                             lr=lr, g=g, bf16=run.bf16, log_every=log_every) if vision_warmup_steps else []
    if freeze_vision_tower:
        run.model.model.vision_tower.requires_grad_(False)
    opt, params = _optimizer(run, lr, weight_decay)
    t0 = time.time()
    done = _loop(run, opt, params, Clock(lr, steps, warmup, minutes), batch_size=batch_size, g=g,
                 per_example_loss=per_example_loss, aux_weight=aux_weight, clip_norm=clip_norm, log_every=log_every,
                 monitor=monitor, monitor_every=max(1, monitor_every))
    train_s = time.time() - t_start
    _save(run, out_dir)
    metrics = {"steps": done["steps"], "planned_steps": steps, "minutes_cap": minutes, "device": str(device),
               "vision_warmup_steps": vision_warmup_steps, "freeze_vision_tower": freeze_vision_tower,
               "per_example_loss": per_example_loss, "batch_size": batch_size, "lr": lr, "seed": seed,
               "bf16_autocast": run.bf16, "n_train_examples": len(run.data.records),
               "assistant_tokens_seen": done["tokens"], "params": sum(p.numel() for p in run.model.parameters()),
               "train_s": round(train_s, 1), "s_per_step": round((time.time() - t0) / done["steps"], 4),
               "first_loss": done["losses"][0]["loss"], "final_loss": done["losses"][-1]["smoothed"],
               "losses": done["losses"], "vision_warmup": warm_log, "monitor": done["monitor"]}
    if eval_data is not None:
        metrics["eval"] = evaluate_target(out_dir, eval_data, device=device)
    return metrics


def _save(run: _Run, out_dir: str | Path) -> None:
    run.model.eval()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    run.model.save_pretrained(str(out_dir))
    run.processor.save_pretrained(str(out_dir))
    run.model.requires_grad_(True)


# ------------------------------------------------------------------------------------------------------------ CLI
def main(argv: list[str] | None = None) -> None:
    import argparse
    import tempfile

    from .shapes_world import TASKS, make_dataset
    from .tokenizer import conversation_texts, train_tokenizer

    parser = argparse.ArgumentParser(prog="python -m mmspec.data_tools.train_target",
                                     description="Generate shapes-world data, train the tokenizer, build, train and "
                                                 "evaluate the mini-vlm target.")
    parser.add_argument("--data-dir", required=True, help="shapes-world data (generated here when missing)")
    parser.add_argument("--out", required=True, help="directory of the trained model, processor and metrics.json")
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--vision-warmup-steps", type=int, default=700,
                        help="vision-tower-only steps on the scene labels before the joint run (0: none)")
    parser.add_argument("--freeze-vision-tower", action=argparse.BooleanOptionalAction, default=True,
                        help="keep the (warmed-up) vision tower fixed in the joint run (default: yes)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--size", default="mini", help=f"one of {', '.join(SIZES)}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-train", type=int, default=40000, help="training examples to generate when missing")
    parser.add_argument("--n-eval", type=int, default=700, help="held-out examples to generate when missing")
    parser.add_argument("--log-every", type=int, default=25)
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                        help="bfloat16 autocast (default: where the device supports it natively)")
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    args = parser.parse_args(argv)
    if args.size not in SIZES:
        parser.error(f"--size must be one of {', '.join(SIZES)}, got {args.size!r}")
    for name in ("steps", "batch_size", "n_train", "n_eval", "log_every"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.lr <= 0:
        parser.error(f"--lr must be positive, got {args.lr}")
    if args.vision_warmup_steps < 0:
        parser.error(f"--vision-warmup-steps must be >= 0, got {args.vision_warmup_steps}")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    data_dir, out = Path(args.data_dir), Path(args.out)
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        parser.error(f"cannot create {e.filename}: {e.strerror}")
    train_jsonl, eval_jsonl, tok_dir = data_dir / "train.jsonl", data_dir / "eval.jsonl", data_dir / "tokenizer"
    if not train_jsonl.is_file():
        make_dataset(args.n_train, data_dir, args.seed, TRAIN_TASKS, "train")
    if not eval_jsonl.is_file():
        # A different seed: held-out scenes; uniform over tasks so every task is graded on enough examples.
        make_dataset(args.n_eval, data_dir, args.seed + 1_000_003, TASKS, "eval")
    if not (tok_dir / "tokenizer.json").is_file():
        train_tokenizer(conversation_texts(train_jsonl), tok_dir)
    with tempfile.TemporaryDirectory(prefix="mini-vlm-init-") as init_dir:
        build_target(tok_dir, init_dir, args.size, args.seed)
        metrics = train_target(init_dir, train_jsonl, out, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                               seed=args.seed, log_every=args.log_every, bf16=args.bf16,
                               vision_warmup_steps=args.vision_warmup_steps,
                               freeze_vision_tower=args.freeze_vision_tower, monitor_data=eval_jsonl,
                               monitor_every=max(1, args.steps // 4), device=args.device)
    metrics["size"] = args.size
    metrics["eval"] = evaluate_target(out, eval_jsonl, predictions_out=out / "eval_predictions.jsonl")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n", encoding="utf-8")
    print(json.dumps({"eval": metrics["eval"], "train_s": metrics["train_s"], "final_loss": metrics["final_loss"]}))


if __name__ == "__main__":
    main()
