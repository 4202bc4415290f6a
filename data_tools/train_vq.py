"""Train mini-gen's image tokenizer: the ``JanusVQVAE`` inside a ``JanusForConditionalGeneration``.

transformers' Janus VQ quantises in two different ways: ``quantize.forward`` takes the plain Euclidean nearest code,
while ``get_codebook_entry`` (which ``decode`` uses) l2-normalises the code it looks up. A VQ trained with the stock
forward would therefore be decoded from vectors it never saw. We train with the rule ``decode`` implies, as LlamaGen
(Sun et al., 2024) does: l2-normalise the encoder output (after ``quant_conv``) and the codebook, take the nearest
code by cosine, pass gradients straight through, and weigh the codebook term 1 and the commitment term 0.25 (the stock
loss weighs them the other way round). ``encode_codes`` applies the same rule, so codes round-trip with ``decode``.

Codes that fall out of use are re-seeded from recent encoder outputs every ``restart_every`` steps (dead-code
restarts), and the reconstruction loss weighs object pixels more: the generator is judged on object count and colour,
and a VQ that blurs a small object into the background loses exactly that.

Pixels are in the processor's range: ``JanusImageProcessor`` with mean = std = 0.5 maps 0..255 to -1..1, and
``processor.postprocess`` maps the decoder's output back.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from mmspec.hardware import native_bf16

from .gen_world import object_mask
from .shapes_world import Scene

logger = logging.getLogger(__name__)

COMMIT = 0.25  # LlamaGen's commitment weight
VQ_MINUTES = 12.0  # wall-clock cap on VQ training; the learning-rate schedule follows whichever of steps and clock
# runs out first
OBJECT_WEIGHT = 4.0  # extra reconstruction weight on object pixels


def load_images(jsonl: Path, cache: Path | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(images [N, 3, px, px] uint8, object masks [N, px, px] float16) of a gen-world JSONL; cached in ``cache``."""
    if cache is not None and cache.exists():
        blob = torch.load(cache)
        return blob["images"], blob["masks"]
    images, masks = [], []
    with open(jsonl, encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # thousands of tiny tensor ops: one thread is much faster on a busy 2-core CPU
    for r in tqdm(records, desc="loading images", unit="img", disable=None):
        im = Image.open(jsonl.parent / r["image"]).convert("RGB")
        images.append(torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(im.height, im.width, 3))
        masks.append(object_mask(Scene.from_dict(r["scene"]), im.width).half())
    torch.set_num_threads(threads)
    images_t, masks_t = torch.stack(images).permute(0, 3, 1, 2).contiguous(), torch.stack(masks)
    if cache is not None:
        torch.save({"images": images_t, "masks": masks_t}, cache)
    return images_t, masks_t


def pick_threads(current: int) -> int:
    """Two threads when this process has the 2-core CPU to itself, else one: oversubscribed threads made a VQ step
    3x slower (9.3 s against 3.3 s) while another training job shared the machine."""
    others = os.getloadavg()[0] - current
    threads = 2 if others < 0.7 else 1
    if threads != torch.get_num_threads():
        torch.set_num_threads(threads)
        logger.info("using %d torch thread(s) (load from other processes ~%.1f)", threads, others)
    return threads


def to_pixels(images: torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 [B, 3, H, W] -> float in -1..1 on ``device``, as JanusImageProcessor with mean = std = 0.5 normalises."""
    return images.to(device).float() / 127.5 - 1.0


def _device(module) -> torch.device:
    return next(module.parameters()).device


def _latents(vqmodel, pixel_values: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] -> l2-normalised encoder output [B, h, w, D] (raster order when flattened)."""
    z = vqmodel.quant_conv(vqmodel.encoder(pixel_values))
    return F.normalize(z.permute(0, 2, 3, 1), dim=-1)


def _nearest(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index of the nearest l2-normalised code by cosine; z [..., D] normalised, codebook [V, D] raw. Always in fp32:
    under bf16 autocast near-tied codes would be picked by rounding, unlike ``encode_codes`` later."""
    with torch.autocast(z.device.type, enabled=False):
        return (z.float() @ F.normalize(codebook.float(), dim=-1).t()).argmax(-1)


@torch.no_grad()
def encode_codes(vqmodel, pixel_values: torch.Tensor) -> torch.Tensor:
    """pixel_values [B, 3, H, W] in -1..1 -> codes [B, h*w] long on the CPU, raster order; ``vqmodel.decode``
    inverts it. Runs where the VQ lives."""
    z = _latents(vqmodel, pixel_values.to(_device(vqmodel)))
    return _nearest(z, vqmodel.quantize.embedding.weight).flatten(1).cpu()


def _forward(vqmodel, x: torch.Tensor):
    """Reconstruction, codebook + commitment loss and codes of a batch x [B, 3, H, W]."""
    z = _latents(vqmodel, x).float()
    idx = _nearest(z.detach(), vqmodel.quantize.embedding.weight)
    e = F.normalize(vqmodel.quantize.embedding(idx), dim=-1)
    vq_loss = F.mse_loss(e, z.detach()) + COMMIT * F.mse_loss(z, e.detach())
    zq = (z + (e - z).detach()).permute(0, 3, 1, 2)  # straight-through
    recon = vqmodel.decoder(vqmodel.post_quant_conv(zq))
    return recon, vq_loss, z, idx


@torch.no_grad()
def _restart_dead(vqmodel, usage: torch.Tensor, recent: torch.Tensor, g: torch.Generator) -> int:
    """Re-seed codes unused since the last restart from recent encoder outputs [M, D]; returns how many."""
    dead = (usage == 0).nonzero().flatten()
    if len(dead) == 0 or len(recent) == 0:
        return 0
    pick = torch.randint(len(recent), (len(dead),), generator=g).to(recent.device)
    noise = 0.01 * torch.randn(len(dead), recent.shape[1], generator=g).to(recent.device)
    vqmodel.quantize.embedding.weight[dead] = F.normalize(recent[pick] + noise, dim=-1)
    return len(dead)


@torch.no_grad()
def evaluate_vq(vqmodel, images: torch.Tensor, batch: int = 256) -> dict:
    """PSNR (0-255 scale) of encode -> stock decode on uint8 images [N, 3, H, W], and codebook usage."""
    mse, used = [], torch.zeros(vqmodel.config.num_embeddings)
    for i in range(0, len(images), batch):
        x = to_pixels(images[i:i + batch], _device(vqmodel))
        codes = encode_codes(vqmodel, x)
        rec = vqmodel.decode(codes.to(x.device)).clamp(-1, 1)
        mse.append(((rec - x) * 127.5).pow(2).mean((1, 2, 3)))
        used += torch.bincount(codes.flatten(), minlength=len(used)).float()
    p = used / used.sum()
    perplexity = math.exp(-(p[p > 0] * p[p > 0].log()).sum().item())
    psnr = (10 * torch.log10(255.0**2 / torch.cat(mse).clamp_min(1e-6))).mean().item()
    return {"psnr": round(psnr, 2), "codes_used": int((used > 0).sum()), "perplexity": round(perplexity, 1)}


def save_recon_grid(vqmodel, images: torch.Tensor, path: Path, n: int = 16, scale: int = 3) -> None:
    """Originals (top row) over their reconstructions (bottom row): do objects keep their colours?"""
    with torch.no_grad():
        x = to_pixels(images[:n], _device(vqmodel))
        rec = ((vqmodel.decode(encode_codes(vqmodel, x).to(x.device)).clamp(-1, 1) + 1) * 127.5).round()
        rec = rec.to(torch.uint8).cpu()
    side = images.shape[-1] * scale
    grid = Image.new("RGB", (side * len(x), side * 2))
    for row, batch in enumerate((images[:n], rec)):
        for i, im in enumerate(batch):
            pil = Image.fromarray(im.permute(1, 2, 0).contiguous().numpy()).resize((side, side), Image.NEAREST)
            grid.paste(pil, (i * side, row * side))
    grid.save(path)


def train_vq(vqmodel, images: torch.Tensor, masks: torch.Tensor, held_out: torch.Tensor, out_dir: Path, *,
             steps: int, batch_size: int = 32, lr: float = 1e-3, restart_every: int = 100, seed: int = 0,
             log_every: int = 50, minutes: float = VQ_MINUTES, resume: bool = False, bf16: bool | None = None,
             freeze_codebook: bool = False) -> dict:
    """Train ``vqmodel`` in place on uint8 images [N, 3, px, px] with object masks [N, px, px]; save
    out_dir/vq.pt (state dict), out_dir/recon.png and out_dir/vq_metrics.json. Returns the metrics.
    Trains where ``vqmodel`` lives (the data stays on the CPU; each batch moves). ``bf16``: bfloat16 autocast (fp32
    weights); None turns it on where the device multiplies bf16 natively (a CPU step costs ~0.55x of fp32 there,
    docs/mini-gen.md). ``freeze_codebook``: train encoder and decoder only, no
    restarts (a fine-tune that keeps every code's meaning, so a generator over these codes still reads them)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if not resume:
        with torch.no_grad():  # codebook on the unit sphere from the start; restarts fix codes init left stranded
            w = vqmodel.quantize.embedding.weight
            w.copy_(F.normalize(torch.randn(w.shape, generator=g), dim=-1))
    vqmodel.train()
    vqmodel.quantize.embedding.weight.requires_grad_(not freeze_codebook)
    opt = torch.optim.AdamW([p for p in vqmodel.parameters() if p.requires_grad], lr=lr, betas=(0.9, 0.95),
                            weight_decay=0.0)
    usage = torch.zeros(vqmodel.config.num_embeddings)
    recent: list[torch.Tensor] = []
    t0, losses, restarts, threads = time.perf_counter(), [], 0, pick_threads(0)
    device = _device(vqmodel)
    bf16 = native_bf16(device) if bf16 is None else bf16
    for step in tqdm(range(steps), desc="vq", unit="step", disable=None):
        progress = max(step / steps, (time.perf_counter() - t0) / (minutes * 60))
        if progress >= 1:
            break
        lr_now = lr * min(1.0, (step + 1) / 100) * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))
        for group in opt.param_groups:
            group["lr"] = lr_now
        if step % 100 == 99:
            threads = pick_threads(threads)
        idx = torch.randint(len(images), (batch_size,), generator=g)
        x, m = to_pixels(images[idx], device), masks[idx].to(device).float().unsqueeze(1)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            recon, vq_loss, z, codes = _forward(vqmodel, x)
        recon = recon.float()  # the decoder ran in bf16; z and the codebook terms are fp32 already (_forward)
        weight = 1.0 + OBJECT_WEIGHT * m
        rec_loss = (weight * ((recon - x).pow(2) + (recon - x).abs())).mean() / weight.mean()
        loss = rec_loss + vq_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g_ in opt.param_groups for p in g_["params"]], 1.0)
        opt.step()
        usage += torch.bincount(codes.flatten(), minlength=len(usage)).float().cpu()
        recent = (recent + [z.detach().flatten(0, 2)])[-8:]
        if (step + 1) % restart_every == 0 and progress < 0.85 and not freeze_codebook:
            restarts += _restart_dead(vqmodel, usage, torch.cat(recent), g)
            usage.zero_()
        losses.append((rec_loss.item(), vq_loss.item()))
        if (step + 1) % log_every == 0 or step + 1 == steps:
            rec_avg = sum(r for r, _ in losses[-log_every:]) / len(losses[-log_every:])
            logger.info("vq step %d/%d rec %.4f vq %.4f lr %.2e (%.0f s)", step + 1, steps, rec_avg,
                        losses[-1][1], lr_now, time.perf_counter() - t0)
    vqmodel.eval()
    metrics = {"steps": len(losses), "batch_size": batch_size, "bf16_autocast": bf16,
               "minutes": round((time.perf_counter() - t0) / 60, 1),
               "final_rec_loss": round(sum(r for r, _ in losses[-50:]) / len(losses[-50:]), 4),
               "codes_restarted": restarts, **evaluate_vq(vqmodel, held_out)}
    logger.info("vq done: %s", metrics)
    save_recon_grid(vqmodel, held_out, out_dir / "recon.png")
    torch.save(vqmodel.state_dict(), out_dir / "vq.pt")
    (out_dir / "vq_metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    return metrics


def judge_reconstructions(vqmodel, images: torch.Tensor, scenes: list[dict], n: int = 64) -> dict:
    """The mini-vlm judge's verdicts (mmspec.quality, full=True) on the first n held-out images and on their VQ
    reconstructions: the reconstructions' faithfulness is the most a generator over these codes can reach."""
    from mmspec import quality

    from .gen_world import expected_answers

    expected = [expected_answers(Scene.from_dict(s)) for s in scenes[:n]]
    with torch.no_grad():
        x = to_pixels(images[:n], _device(vqmodel))
        rec = ((vqmodel.decode(encode_codes(vqmodel, x).to(x.device)).clamp(-1, 1) + 1) * 127.5).round()
        rec = rec.to(torch.uint8).cpu()
    out = {}
    for name, batch in (("rendered", images[:n]), ("reconstructed", rec)):
        pil = [Image.fromarray(b.permute(1, 2, 0).contiguous().numpy()) for b in batch]
        verdicts = quality.judge_images(pil, expected, full=True)
        out[name] = {k: round(sum(bool(v[k]) for v in verdicts) / len(verdicts), 3)
                     for k in ("faithful", "count_ok", "colours_ok", "absent_ok")}
    return {"n": len(expected), **out}

