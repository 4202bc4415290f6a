"""mini-vlm's vision warm-up: a probe that reads each grid cell's object from the projected image tokens, and the
stage that trains the vision tower and projector on it before the decoder sees an image.

Split from ``train_target`` along the vision seam.
"""

from __future__ import annotations

import logging
import math
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from mmspec.errors import InputError

from .shapes_world import COLOURS, SHAPES
from .shapes_world import SIZES as SIZES_WORDS
from .target_data import EncodedSet, patch_cells

logger = logging.getLogger(__name__)


class VisionProbe(torch.nn.Module):
    """Training-only auxiliary heads on the projected image tokens, dropped at save time (the shipped model is a plain
    LlavaForConditionalGeneration).

    Trained from scratch with a text loss alone, a LLaVA on templated answers learns the text prior long before its
    vision tower says anything useful, and the image tokens collapse (``image_spread`` falls to ~0.05 within 100
    steps). Two dense signals keep them informative: a cell head reads each 3x3 grid cell's object (shape, colour,
    size, or empty) from the tokens pooled over the cell, and a patch head reads the cell's object and the cell
    itself from every single token (:func:`patch_labels`). Colour and size are learned in a few dozen steps; shape
    is what a ViT from scratch learns slowly. With attributes and cell linearly readable from every token, "what
    colour is the circle at the top left" is one attention lookup away for the decoder.
    """

    SPLITS = (len(SHAPES) + 1, len(COLOURS) + 1, len(SIZES_WORDS) + 1)  # class 0 = no object

    def __init__(self, hidden: int, grid: int) -> None:
        super().__init__()
        self.grid = grid
        self.cell = torch.nn.Linear(hidden, sum(self.SPLITS))
        self.patch = torch.nn.Linear(hidden, sum(self.SPLITS) + 9)
        self.register_buffer("patch_cell", patch_cells(grid), persistent=False)

    def forward(self, image_tokens: torch.Tensor, cells: torch.Tensor,
                patches: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """image_tokens [N, grid*grid, H]; cells [N, 9, 3] and patches [N, grid*grid, 3] class ids ->
        (loss, {"cell": exact-cell accuracy, "shape": shape accuracy on occupied cells}), the accuracies as
        0-d tensors (reading them would make a GPU wait every step)."""
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
            stats = {"cell": right.all(0).float().mean(),
                     "shape": (right[0] & occupied).sum() / occupied.sum().clamp_min(1)}
        return loss, stats

    def _ce(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        parts = logits.float().split(self.SPLITS, dim=-1)
        return sum(F.cross_entropy(p.reshape(-1, p.shape[-1]), labels[..., k].reshape(-1))
                   for k, p in enumerate(parts)) / len(parts)


def _schedule(lr: float, steps: int, warmup: float):
    """Linear warmup over ``warmup`` of the steps, then cosine decay to a tenth of ``lr`` (steps count from 1)."""
    n_warm = max(1, int(warmup * steps))

    def lr_at(step: int) -> float:
        if step <= n_warm:
            return lr * step / n_warm
        t = (step - n_warm) / max(1, steps - n_warm)
        return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))
    return lr_at


def tower_image_tokens(model, pixel_values: torch.Tensor) -> torch.Tensor:
    feats = model.model.get_image_features(pixel_values=pixel_values).pooler_output
    return torch.stack(list(feats)) if isinstance(feats, (list, tuple)) else feats  # (N, tokens, hidden)


def vision_warmup(model, data: EncodedSet, probe: VisionProbe, *, steps: int, batch_size: int, lr: float,
                  g: torch.Generator, bf16: bool, log_every: int, clip_norm: float = 1.0) -> list[dict]:
    """Stage 0: train the vision tower and projector alone on the probe's scene labels, so that the language model
    meets image tokens that already say what is where.

    LLaVA's own recipe starts from a pretrained CLIP; mini-vlm has none, and a ViT from scratch needs thousands of
    images' worth of steps to tell a star from a cross. Those steps are ~4x cheaper here (no decoder, no text) than
    inside the joint run. Images are drawn from the single-image records (with replacement, seeded by ``g``).
    """
    singles = [data.image_rows[i][0] for i, r in enumerate(data.records)
               if len(r["images"]) == 1 and isinstance(r.get("scene"), dict)]
    if not singles:
        raise InputError("the vision warm-up needs single-image records with a 'scene' (shapes-world data)")
    device = next(model.parameters()).device
    params = [*model.model.vision_tower.parameters(), *model.model.multi_modal_projector.parameters(),
              *probe.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    lr_at, log, t0 = _schedule(lr, steps, 0.05), [], time.time()
    model.train()
    for step in tqdm(range(1, steps + 1), desc="vision warm-up", unit="step", disable=None):
        rows = torch.tensor([singles[k] for k in torch.randint(len(singles), (batch_size,), generator=g).tolist()])
        rows = rows.to(data.pixels.device)
        cells = data.cells[rows]
        cells, patches = cells.to(device), cells[:, probe.patch_cell.to(cells.device)].to(device)
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            tokens = tower_image_tokens(model, data.pixels[rows].to(device).float())
        loss, stats = probe(tokens.float(), cells, patches)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, clip_norm)
        opt.step()
        if step == 1 or step % log_every == 0 or step == steps:
            log.append({"step": step, "loss": round(loss.item(), 5), "cell_acc": round(float(stats["cell"]), 4),
                        "shape_acc": round(float(stats["shape"]), 4), "elapsed_s": round(time.time() - t0, 1)})
            logger.info("warm-up step %d probe loss %.4f cells exact %.3f shapes %.3f %.1fs", step, loss.item(),
                        stats["cell"], stats["shape"], time.time() - t0)
    return log
