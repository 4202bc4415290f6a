"""mini-vlm's training data: conversations laid out as the processor lays them out, scene labels for the vision
probe, and an :class:`EncodedSet` that tokenizes and preprocesses every image once, in parallel, so a training step
only gathers tensors (on a GPU a step is far cheaper than decoding a batch of PNGs).

Split from ``train_target`` (which keeps the model and the training loop) along the data seam.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image

from mmspec.adapters.base import image_chat

from .shapes_world import COLOURS, SHAPES, make_dataset
from .shapes_world import SIZES as SIZES_WORDS
from .tokenizer import IMAGE

logger = logging.getLogger(__name__)

SHARD_SEED_STRIDE = 9_973  # shard k of a sharded dataset draws from seed + k * stride


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
    n_img = image_token_count(processor)
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


def image_token_count(processor) -> int:
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


def load_scene_images(paths: Sequence[str]) -> list[Image.Image]:
    out = []
    for p in paths:
        with Image.open(p) as im:
            out.append(im.convert("RGB"))
    return out


def length_grouped_batches(lengths: Sequence[int], batch_size: int, g: torch.Generator) -> list[list[int]]:
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


# ---------------------------------------------------------------------------------------------------- scene labels
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


def _record_scenes(record: dict) -> list[dict] | None:
    """The scene dict of each of the record's images, or None when some image has none."""
    sc = record.get("scene")
    sc = sc if isinstance(sc, list) else [sc] if sc else []
    return sc if sc and len(sc) == len(record["images"]) else None


# ---------------------------------------------------------------------------------------------------- encoded sets
@dataclass(frozen=True)
class EncodedSet:
    """Every record of a training file, tokenized, with each image preprocessed once.

    ``pixels`` [n_images, 3, px, px] fp16 (what the image processor returns, rounded: the inputs are normalised
    colours of flat shapes, far coarser than fp16's step); ``cells`` [n_images, 9, 3] scene labels (zeros where the
    record has no scene, see ``labelled``); ``image_rows[i]``: record i's rows of ``pixels``, in order."""
    records: list[dict]
    encoded: list[tuple[list[int], list[int]]]
    image_rows: list[list[int]]
    pixels: torch.Tensor
    cells: torch.Tensor
    labelled: list[bool]

    @property
    def lengths(self) -> list[int]:
        return [len(x) for x, _ in self.encoded]

    def to(self, device: torch.device) -> "EncodedSet":
        return EncodedSet(self.records, self.encoded, self.image_rows, self.pixels.to(device),
                          self.cells.to(device), self.labelled)


_WORKER_PROCESSOR = None  # set in the parent before the pool forks, so workers need not load it


def _encode_chunk(records: list[dict]) -> tuple[list, torch.Tensor, torch.Tensor, list[bool]]:
    torch.set_num_threads(1)
    processor = _WORKER_PROCESSOR
    encoded = [encode_example(processor, r) for r in records]
    paths = [p for r in records for p in r["images"]]
    pixels = processor.image_processor(load_scene_images(paths), return_tensors="pt")["pixel_values"].half() if paths \
        else torch.zeros(0, 3, 1, 1, dtype=torch.float16)
    scenes = [_record_scenes(r) for r in records]
    cells = [cell_labels(s) if sc else torch.zeros(9, 3, dtype=torch.long)
             for r, sc in zip(records, scenes) for s in (sc or [None] * len(r["images"]))]
    cells_t = torch.stack(cells) if cells else torch.zeros(0, 9, 3, dtype=torch.long)
    return encoded, pixels, cells_t, [sc is not None for sc in scenes]


def workers_available() -> int:
    """Processes for CPU-side data work: the cores this process may run on."""
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def encode_set(processor, records: list[dict], workers: int | None = None, chunk: int = 512) -> EncodedSet:
    """Tokenize every record and preprocess every image, in ``workers`` forked processes (default: every core)."""
    global _WORKER_PROCESSOR
    workers = workers or workers_available()
    chunks = [records[s:s + chunk] for s in range(0, len(records), chunk)]
    _WORKER_PROCESSOR = processor
    if workers > 1 and len(chunks) > 1:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        with multiprocessing.get_context("fork").Pool(min(workers, len(chunks))) as pool:
            parts = pool.map(_encode_chunk, chunks)
    else:
        parts = [_encode_chunk(c) for c in chunks]
    _WORKER_PROCESSOR = None
    encoded = [e for p in parts for e in p[0]]
    image_rows, n = [], 0
    for r in records:
        image_rows.append(list(range(n, n + len(r["images"]))))
        n += len(r["images"])
    pixels = [p[1] for p in parts if len(p[1])]
    return EncodedSet(records, encoded, image_rows, torch.cat(pixels) if pixels else torch.zeros(0),
                      torch.cat([p[2] for p in parts]), [b for p in parts for b in p[3]])


def collate(data: EncodedSet, idx: list[int], grid: int, pad: int, device: torch.device) -> dict:
    """A padded batch of records ``idx`` on ``device``; ``scene_labels`` (cells [N, 9, 3], patches [N, grid^2, 3])
    when every record of the batch has its scenes, else None."""
    width = max(len(data.encoded[i][0]) for i in idx)
    ids = torch.full((len(idx), width), pad, dtype=torch.long)
    labels = torch.full((len(idx), width), -100, dtype=torch.long)
    mask = torch.zeros((len(idx), width), dtype=torch.long)
    for row, i in enumerate(idx):
        x, y = data.encoded[i]
        ids[row, :len(x)], labels[row, :len(y)], mask[row, :len(x)] = torch.tensor(x), torch.tensor(y), 1
    rows = torch.tensor([k for i in idx for k in data.image_rows[i]], dtype=torch.long)
    on = rows.to(data.pixels.device)
    scene = None
    if all(data.labelled[i] for i in idx) and len(rows):
        cells = data.cells[on]
        scene = (cells.to(device), cells[:, patch_cells(grid).to(cells.device)].to(device))
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device),
            "pixel_values": data.pixels[on].to(device).float() if len(rows) else None, "scene_labels": scene}



# --------------------------------------------------------------------------------------------------- sharded data
def _make_shard(args: tuple) -> Path:
    n, out_dir, seed, tasks, split = args
    torch.set_num_threads(1)
    return make_dataset(n, out_dir, seed, tasks, split)


def make_dataset_sharded(n: int, out_dir: str | Path, seed: int, tasks: Sequence[str], split: str, shards: int,
                         workers: int | None = None) -> Path:
    """``make_dataset`` in ``shards`` seeded parts (shard k: seed + k * SHARD_SEED_STRIDE), drawn in parallel and
    joined into out_dir/<split>.jsonl. The shards, not the processes, fix the data: any machine draws the same."""
    if shards <= 1:
        return make_dataset(n, out_dir, seed, tasks, split)
    out_dir = Path(out_dir)
    sizes = [n // shards + (k < n % shards) for k in range(shards)]
    jobs = [(sizes[k], out_dir, seed + k * SHARD_SEED_STRIDE, tuple(tasks), f"{split}-{k:02d}")
            for k in range(shards) if sizes[k]]
    with multiprocessing.get_context("fork").Pool(min(workers or workers_available(), len(jobs))) as pool:
        parts = pool.map(_make_shard, jobs)
    path = out_dir / f"{split}.jsonl"
    with open(path, "w", encoding="utf-8") as out:
        for part in parts:
            out.write(part.read_text(encoding="utf-8"))
            part.unlink()
    logger.info("joined %d shards into %s", len(parts), path)
    return path
