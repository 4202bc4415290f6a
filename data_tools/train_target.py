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

import argparse
import json
import logging
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from PIL import Image
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

from mmspec.adapters.base import image_chat
from mmspec.errors import InputError

from .shapes_world import COLOURS, SHAPES, SIZE_PX, TASKS, check_answer, make_dataset
from .shapes_world import SIZES as SIZES_WORDS
from .tokenizer import IMAGE, conversation_texts, train_tokenizer

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


# ----------------------------------------------------------------------------------------------------------- data
def chat_messages(record: dict, with_answer: bool = True) -> list[dict]:
    """A training record's messages (up to the first answer unless `with_answer`) in the one image chat layout."""
    turns = list(record["messages"])
    if not with_answer:
        turns = turns[: next((i for i, m in enumerate(turns) if m["role"] == "assistant"), len(turns))]
    return image_chat(turns, len(record.get("images", [])))


def encode_example(processor, record: dict) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one conversation as the processor lays it out; labels are -100 off the assistant turns.

    The tokenizer marks assistant tokens through the template's ``{% generation %}`` block; each ``<image>`` is then
    expanded to the image's patch tokens exactly as ``LlavaProcessor`` expands it (special tokens split the text, so
    the tokens around them do not change).
    """
    tok = processor.tokenizer
    enc = tok.apply_chat_template(chat_messages(record), tokenize=True, return_dict=True,
                                  return_assistant_tokens_mask=True)
    n_img = _num_image_tokens(processor)
    image_id = tok.convert_tokens_to_ids(IMAGE)
    ids, labels = [], []
    for t, m in zip(enc["input_ids"], enc["assistant_masks"]):
        if t == image_id:
            ids += [t] * n_img
            labels += [-100] * n_img
        else:
            ids.append(t)
            labels.append(t if m else -100)
    return ids, labels


def _num_image_tokens(processor) -> int:
    crop = processor.image_processor.crop_size
    n = (crop["height"] // processor.patch_size) * (crop["width"] // processor.patch_size)
    return n + processor.num_additional_image_tokens - (processor.vision_feature_select_strategy == "default")


def load_records(jsonl: str | Path) -> list[dict]:
    """Records of a training JSONL, with image paths made absolute (they are relative to the JSONL's folder)."""
    jsonl = Path(jsonl)
    records = []
    with open(jsonl, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                r = json.loads(line)
                r["images"] = [str(jsonl.parent / p) for p in r.get("images", [])]
                records.append(r)
    return records


def _load_images(paths: Sequence[str]) -> list[Image.Image]:
    out = []
    for p in paths:
        with Image.open(p) as im:
            out.append(im.convert("RGB"))
    return out


def _length_grouped_batches(lengths: Sequence[int], batch_size: int, g: torch.Generator) -> list[list[int]]:
    """Shuffled batches of similar lengths: sort within shuffled chunks of 64 batches, then shuffle the batches.

    Describe answers are ~10x longer than one-word answers; grouping them wastes far less compute on padding.
    """
    order = torch.randperm(len(lengths), generator=g).tolist()
    chunk = 64 * batch_size
    batches = []
    for s in range(0, len(order), chunk):
        part = sorted(order[s:s + chunk], key=lambda i: lengths[i])
        batches += [part[k:k + batch_size] for k in range(0, len(part), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]


class VisionProbe(torch.nn.Module):
    """Training-only auxiliary heads on the projected image tokens, dropped at save time (the shipped model is a plain
    LlavaForConditionalGeneration).

    Trained from scratch with a text loss alone, a LLaVA on templated answers learns the text prior long before its
    vision tower says anything useful, and the image tokens collapse (``image_spread`` falls to ~0.05 within 100
    steps). Two dense signals keep them informative: a cell head reads each 3x3 grid cell's object (shape, colour,
    size, or empty) from the tokens pooled over the cell, and a patch head reads the cell's object and the cell
    itself from every single token (:func:`patch_labels`). Colour and size are learned in a few dozen steps; shape
    is what a ViT from scratch learns slowly. With attributes and cell linearly readable from every token, "what
    colour is the circle at the top left" is one attention lookup away for the decoder (which the joint run alone
    learns to ~70 % and build_minis' short-answer stage to 97 %: see the README).
    """

    SPLITS = (len(SHAPES) + 1, len(COLOURS) + 1, len(SIZES_WORDS) + 1)  # class 0 = no object

    def __init__(self, hidden: int, grid: int) -> None:
        super().__init__()
        self.grid = grid
        self.cell = torch.nn.Linear(hidden, sum(self.SPLITS))
        self.patch = torch.nn.Linear(hidden, sum(self.SPLITS) + 9)
        self.register_buffer("patch_cell", patch_cells(grid), persistent=False)

    def forward(self, image_tokens: torch.Tensor, cells: torch.Tensor, patches: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """image_tokens [N, grid*grid, H]; cells [N, 9, 3] and patches [N, grid*grid, 3] class ids ->
        (loss, {"cell": exact-cell accuracy, "shape": shape accuracy on occupied cells})."""
        n, _, h = image_tokens.shape
        x = image_tokens.reshape(n, self.grid, self.grid, h).permute(0, 3, 1, 2)
        cell_logits = self.cell(F.adaptive_avg_pool2d(x, 3).flatten(2).transpose(1, 2))
        patch_logits = self.patch(image_tokens).float()
        where = F.cross_entropy(patch_logits[..., -9:].reshape(-1, 9), self.patch_cell.repeat(n))
        loss = (self._ce(cell_logits, cells) + self._ce(patch_logits[..., :-9], patches) + where) / 3
        with torch.no_grad():
            parts = cell_logits.split(self.SPLITS, dim=-1)
            right = torch.stack([p.argmax(-1) == cells[..., k] for k, p in enumerate(parts)])
            occupied = cells[..., 0] > 0
            stats = {"cell": right.all(0).float().mean().item(),
                     "shape": right[0][occupied].float().mean().item() if occupied.any() else float("nan")}
        return loss, stats

    def _ce(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        parts = logits.float().split(self.SPLITS, dim=-1)
        return sum(F.cross_entropy(p.reshape(-1, p.shape[-1]), labels[..., k].reshape(-1))
                   for k, p in enumerate(parts)) / len(parts)


def _object_ids(o: dict) -> torch.Tensor:
    return torch.tensor([SHAPES.index(o["shape"]) + 1, list(COLOURS).index(o["colour"]) + 1,
                         SIZES_WORDS.index(o["size"]) + 1])


def cell_labels(scene: dict) -> torch.Tensor:
    """[9, 3] class ids per grid cell for one scene dict: shape, colour, size (1-based), 0 for an empty cell."""
    out = torch.zeros(9, 3, dtype=torch.long)
    for o in scene["objects"]:
        out[o["cell"]] = _object_ids(o)
    return out


def patch_cells(grid: int) -> torch.Tensor:
    """[grid*grid] the 3x3 grid cell (0..8) each image patch's centre lies in, row-major."""
    row = ((torch.arange(grid) + 0.5) * 3 / grid).long()
    return (row[:, None] * 3 + row[None, :]).flatten()


def patch_labels(scene: dict, grid: int) -> torch.Tensor:
    """[grid*grid, 3] class ids per image patch: those of the object in the patch's grid cell, else 0.

    Every patch of an occupied cell carries the object, not only the patches it covers, so the decoder can count
    objects as a fraction of tokens whatever their sizes, and finds "the circle at the top left" in any of the cell's
    tokens. With a grid of a multiple of 3 (mini-vlm: 6) the cells are exactly whole patches."""
    return cell_labels(scene)[patch_cells(grid)]


def _scene_labels(records: list[dict], idx: list[int], grid: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(cells, patches) labels of every image of the chosen records, or None when some image has no scene."""
    scenes = []
    for i in idx:
        sc = records[i].get("scene")
        sc = sc if isinstance(sc, list) else [sc] if sc else []
        if len(sc) != len(records[i]["images"]):
            return None
        scenes += sc
    if not scenes:
        return None
    return (torch.stack([cell_labels(sc) for sc in scenes]), torch.stack([patch_labels(sc, grid) for sc in scenes]))


def _collate(processor, records: list[dict], encoded: list[tuple[list[int], list[int]]], idx: list[int],
             grid: int) -> dict:
    pad = processor.tokenizer.pad_token_id
    width = max(len(encoded[i][0]) for i in idx)
    ids = torch.full((len(idx), width), pad, dtype=torch.long)
    labels = torch.full((len(idx), width), -100, dtype=torch.long)
    mask = torch.zeros((len(idx), width), dtype=torch.long)
    images = []
    for row, i in enumerate(idx):
        x, y = encoded[i]
        ids[row, :len(x)], labels[row, :len(y)], mask[row, :len(x)] = torch.tensor(x), torch.tensor(y), 1
        images += records[i]["images"]
    pixels = processor.image_processor(_load_images(images), return_tensors="pt")["pixel_values"]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "pixel_values": pixels,
            "scene_labels": _scene_labels(records, idx, grid)}


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


@torch.no_grad()
def image_spread(model, pixel_values: torch.Tensor) -> float:
    """How much the projected image tokens differ between images, relative to their size (pixel_values: (N, 3, H, W)).

    About 0.7 at initialisation. A from-scratch LLaVA can collapse into ignoring its images: the vision tower's
    output grows a large image-independent component and this ratio falls towards 0 while the loss still falls on
    the text prior alone. Logged so such a run is stopped early.
    """
    feats = _image_tokens(model, pixel_values)
    return float(feats.std(0).mean() / feats.std().clamp_min(1e-12))


def _bf16_supported() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


# ---------------------------------------------------------------------------------------------------------- train
def _schedule(lr: float, steps: int, warmup: float):
    """Linear warmup over ``warmup`` of the steps, then cosine decay to a tenth of ``lr`` (steps count from 1)."""
    n_warm = max(1, int(warmup * steps))

    def lr_at(step: int) -> float:
        if step <= n_warm:
            return lr * step / n_warm
        t = (step - n_warm) / max(1, steps - n_warm)
        return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))
    return lr_at


def _image_tokens(model, pixel_values: torch.Tensor) -> torch.Tensor:
    feats = model.model.get_image_features(pixel_values=pixel_values).pooler_output
    return torch.stack(list(feats)) if isinstance(feats, (list, tuple)) else feats  # (N, tokens, hidden)


def vision_warmup(model, processor, records: list[dict], probe: VisionProbe, *, steps: int, batch_size: int,
                  lr: float, g: torch.Generator, bf16: bool, log_every: int, clip_norm: float = 1.0) -> list[dict]:
    """Stage 0: train the vision tower and projector alone on the probe's scene labels, so that the language model
    meets image tokens that already say what is where.

    LLaVA's own recipe starts from a pretrained CLIP; mini-vlm has none, and a ViT from scratch needs thousands of
    images' worth of steps to tell a star from a cross. Those steps are ~4x cheaper here (no decoder, no text) than
    inside the joint run. Images are drawn from the single-image records (with replacement, seeded by ``g``).
    """
    singles = [i for i, r in enumerate(records) if len(r["images"]) == 1 and isinstance(r.get("scene"), dict)]
    if not singles:
        raise InputError("the vision warm-up needs single-image records with a 'scene' (shapes-world data)")
    params = [*model.model.vision_tower.parameters(), *model.model.multi_modal_projector.parameters(),
              *probe.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    lr_at, log, t0 = _schedule(lr, steps, 0.05), [], time.time()
    model.train()
    for step in tqdm(range(1, steps + 1), desc="vision warm-up", unit="step", disable=None):
        idx = [singles[k] for k in torch.randint(len(singles), (batch_size,), generator=g).tolist()]
        pixels = processor.image_processor(_load_images([records[i]["images"][0] for i in idx]),
                                           return_tensors="pt")["pixel_values"]
        cells, patches = _scene_labels(records, idx, probe.grid)
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            tokens = _image_tokens(model, pixels)
        loss, stats = probe(tokens.float(), cells, patches)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, clip_norm)
        opt.step()
        if step == 1 or step % log_every == 0 or step == steps:
            log.append({"step": step, "loss": round(loss.item(), 5), "cell_acc": round(stats["cell"], 4),
                        "shape_acc": round(stats["shape"], 4), "elapsed_s": round(time.time() - t0, 1)})
            logger.info("warm-up step %d probe loss %.4f cells exact %.3f shapes %.3f %.1fs", step, loss.item(),
                        stats["cell"], stats["shape"], time.time() - t0)
    return log


def train_target(model_dir: str | Path, data_jsonl: str | Path, out_dir: str | Path, *, steps: int,
                 batch_size: int = 32, lr: float = 1e-3, seed: int = 0, log_every: int = 10,
                 eval_data: str | Path | None = None, warmup: float = 0.05, weight_decay: float = 0.05,
                 clip_norm: float = 1.0, bf16: bool | None = None, aux_weight: float = 1.0,
                 vision_warmup_steps: int = 0, freeze_vision_tower: bool = False,
                 monitor_data: str | Path | None = None, monitor_every: int = 0, monitor_n: int = 96,
                 per_example_loss: bool = False) -> dict:
    """Train the model in ``model_dir`` on the assistant tokens of ``data_jsonl``; save model + processor to ``out_dir``.

    ``vision_warmup_steps`` > 0 first runs :func:`vision_warmup` (batches twice ``batch_size``). The joint stage then
    trains the rest (the vision tower too unless ``freeze_vision_tower``): next-token loss on the assistant tokens
    plus ``aux_weight`` times the probe loss (shapes-world records only). Freezing the warmed-up tower is LLaVA's
    recipe; a pilot that kept training it saw its shape accuracy fall from 1.0 to ~0.85 under the first gradients
    of the random decoder. AdamW with linear warmup (``warmup`` of the steps) and cosine decay to a tenth of ``lr``;
    gradients clipped to ``clip_norm``. ``bf16``: bfloat16 autocast (fp32 master weights); None turns it on where
    the CPU has native bfloat16. ``monitor_data``/``monitor_every``: grade greedy answers to the first
    ``monitor_n`` count and colour questions of that JSONL every so many steps (logged, kept in the metrics).
    ``per_example_loss``: every answer weighs the same (token losses averaged within each answer, then over the
    batch) rather than every token, which lets a long description outweigh a one-word colour answer some twentyfold
    (``answer_loss``; build_minis' short-answer stage uses it).
    Returns metrics (losses, time, and ``eval`` when ``eval_data``).
    """
    if steps <= 0 or batch_size <= 0 or lr <= 0 or vision_warmup_steps < 0:
        raise InputError(f"steps, batch_size and lr must be positive and vision_warmup_steps >= 0; got {steps}, "
                         f"{batch_size}, {lr}, {vision_warmup_steps}")
    torch.set_num_threads(NUM_THREADS)
    # Optimizer states of rarely-updated weights decay into subnormal floats, which x86 CPUs compute on in
    # microcode at a small fraction of normal speed; flushing them to zero changes nothing measurable.
    torch.set_flush_denormal(True)
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    bf16 = _bf16_supported() if bf16 is None else bf16
    model = AutoModelForImageTextToText.from_pretrained(str(model_dir), dtype=torch.float32,
                                                        attn_implementation="sdpa")
    processor = AutoProcessor.from_pretrained(str(model_dir))
    records = load_records(data_jsonl)
    if not records:
        raise InputError(f"{data_jsonl} holds no conversations")
    monitor = [r for r in load_records(monitor_data) if r["task"] in ("count", "colour")][:monitor_n] \
        if monitor_data is not None and monitor_every > 0 else []
    encoded = [encode_example(processor, r) for r in tqdm(records, desc="tokenize", unit="ex", disable=None)]
    lengths = [len(x) for x, _ in encoded]
    grid = int(round(_num_image_tokens(processor) ** 0.5))
    probe = VisionProbe(model.config.text_config.hidden_size, grid)
    t_start = time.time()
    warm_log = vision_warmup(model, processor, records, probe, steps=vision_warmup_steps, batch_size=2 * batch_size,
                             lr=lr, g=g, bf16=bf16, log_every=log_every) if vision_warmup_steps else []

    if freeze_vision_tower:
        model.model.vision_tower.requires_grad_(False)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in trainable if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in trainable if not (p.ndim >= 2 and "embed" not in n)]
    captured: dict[str, torch.Tensor] = {}
    hook = model.model.multi_modal_projector.register_forward_hook(lambda _m, _i, out: captured.__setitem__("img", out))
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay + list(probe.parameters()), "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95), eps=1e-8)
    lr_at = _schedule(lr, steps, warmup)
    spread_pixels = _collate(processor, records, encoded, list(range(min(16, len(records)))), grid)["pixel_values"]
    model.train()
    batches: list[list[int]] = []
    losses, monitored, t0, tokens = [], [], time.time(), 0
    bar = tqdm(range(1, steps + 1), desc="train mini-vlm", unit="step", disable=None)
    running = None
    for step in bar:
        if not batches:
            batches = _length_grouped_batches(lengths, batch_size, g)
        batch = _collate(processor, records, encoded, batches.pop(), grid)
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           pixel_values=batch["pixel_values"]).logits
        labels = batch["labels"][:, 1:]
        loss = answer_loss(logits[:, :-1], labels, per_example_loss)
        shape_acc, loss_total = float("nan"), loss
        if aux_weight > 0 and batch["scene_labels"] is not None:
            aux, stats = probe(captured["img"].float(), *batch["scene_labels"])
            loss_total, shape_acc = loss + aux_weight * aux, stats["shape"]
        opt.zero_grad(set_to_none=True)
        loss_total.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(decay + no_decay, clip_norm)
        opt.step()
        tokens += int((labels != -100).sum())
        running = loss.item() if running is None else 0.9 * running + 0.1 * loss.item()
        bar.set_postfix(loss=f"{running:.4f}", lr=f"{lr_at(step):.2e}")
        if step == 1 or step % log_every == 0 or step == steps:
            spread = image_spread(model, spread_pixels)
            losses.append({"step": step, "loss": round(loss.item(), 5), "smoothed": round(running, 5),
                           "grad_norm": round(float(grad_norm), 4), "image_spread": round(spread, 4),
                           "elapsed_s": round(time.time() - t0, 1)})
            logger.info("step %d loss %.4f (smoothed %.4f) grad %.3f lr %.2e image spread %.3f probe shapes %.2f "
                        "%.1fs", step, loss.item(), running, float(grad_norm), lr_at(step), spread, shape_acc,
                        time.time() - t0)
        if monitor and (step % monitor_every == 0 or step == steps):
            scores, _ = grade(model, processor, monitor)
            monitored.append({"step": step, **scores})
            logger.info("step %d held-out answers: %s", step, scores)
    train_s = time.time() - t_start
    hook.remove()
    model.eval()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir))
    processor.save_pretrained(str(out_dir))
    model.requires_grad_(True)
    metrics = {"steps": steps, "vision_warmup_steps": vision_warmup_steps, "freeze_vision_tower": freeze_vision_tower,
               "per_example_loss": per_example_loss,
               "batch_size": batch_size, "lr": lr,
               "seed": seed, "bf16_autocast": bf16, "n_train_examples": len(records), "assistant_tokens_seen": tokens,
               "params": sum(p.numel() for p in model.parameters()), "train_s": round(train_s, 1),
               "s_per_step": round((time.time() - t0) / steps, 3), "first_loss": losses[0]["loss"],
               "final_loss": losses[-1]["smoothed"], "losses": losses, "vision_warmup": warm_log,
               "monitor": monitored}
    if eval_data is not None:
        metrics["eval"] = evaluate_target(out_dir, eval_data)
    return metrics


# ----------------------------------------------------------------------------------------------------------- eval
@torch.no_grad()
def evaluate_target(model_dir: str | Path, eval_jsonl: str | Path, n: int | None = None, batch_size: int = 16,
                    predictions_out: str | Path | None = None) -> dict:
    """Greedy answers to the first ``n`` held-out examples, graded with ``check_answer``: {task: accuracy, ...}.

    ``overall`` is the accuracy over all graded examples; ``predictions_out`` (optional) receives one JSON line per
    example with the question, the model's answer, the reference and whether it was graded correct.
    """
    torch.set_num_threads(NUM_THREADS)
    model = AutoModelForImageTextToText.from_pretrained(str(model_dir), dtype=torch.float32,
                                                        attn_implementation="sdpa").eval()
    processor = AutoProcessor.from_pretrained(str(model_dir))
    results, preds = grade(model, processor, load_records(eval_jsonl)[:n], batch_size)
    if predictions_out is not None:
        with open(predictions_out, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(p) + "\n" for p in preds)
    return results


@torch.no_grad()
def grade(model, processor, records: list[dict], batch_size: int = 16) -> tuple[dict, list[dict]]:
    """({task: accuracy, "overall": ...}, predictions) of greedy answers by an in-memory model to ``records``."""
    was_training, side = model.training, processor.tokenizer.padding_side
    model.eval()
    processor.tokenizer.padding_side = "left"  # batched generation appends on the right
    by_task: dict[str, list[dict]] = {}
    for r in records:
        by_task.setdefault(r["task"], []).append(r)
    results, preds = {}, []
    bar = tqdm(total=len(records), desc="evaluate mini-vlm", unit="ex", disable=None, leave=False)
    for task in sorted(by_task, key=lambda t: TASKS.index(t) if t in TASKS else len(TASKS)):
        rs, correct = by_task[task], 0
        for s in range(0, len(rs), batch_size):
            chunk = rs[s:s + batch_size]
            texts = [processor.apply_chat_template(chat_messages(r, with_answer=False), add_generation_prompt=True,
                                                   tokenize=False) for r in chunk]
            images = [im for r in chunk for im in _load_images(r["images"])]
            inputs = processor(text=texts, images=images or None, padding=True, return_tensors="pt")
            out = model.generate(**inputs, do_sample=False, max_new_tokens=224 if task == "describe" else 48)
            answers = processor.tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
            for r, a in zip(chunk, answers):
                ok = check_answer(r, a)
                correct += ok
                preds.append({"task": task, "question": r["messages"][0]["content"], "answer": a.strip(),
                              "reference": r["messages"][1]["content"], "correct": bool(ok)})
            bar.update(len(chunk))
        results[task] = round(correct / len(rs), 4)
    bar.close()
    results["overall"] = round(sum(p["correct"] for p in preds) / max(1, len(preds)), 4)
    processor.tokenizer.padding_side = side
    model.train(was_training)
    return results, preds


# ------------------------------------------------------------------------------------------------------------ CLI
def main(argv: Sequence[str] | None = None) -> None:
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
                        help="bfloat16 autocast (default: where the CPU supports it natively)")
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
                               monitor_every=max(1, args.steps // 4))
    metrics["size"] = args.size
    metrics["eval"] = evaluate_target(out, eval_jsonl, predictions_out=out / "eval_predictions.jsonl")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n", encoding="utf-8")
    print(json.dumps({"eval": metrics["eval"], "train_s": metrics["train_s"], "final_loss": metrics["final_loss"]}))


if __name__ == "__main__":
    main()
