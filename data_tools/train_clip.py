"""Train mini-clip: the small CLIP behind mmspec.quality's CLIPScore and FID for the image-generation bench.

A contrastive (InfoNCE, Radford et al. 2021) image/text model built with open_clip's own ``CLIP`` class and loss, on
textured shapes-world scenes (``gen_world.render_textured``, 32 px) paired with ``gen_world.prompt_of`` captions.
The scenes come from a pool rendered once (rendering costs about as much as a training step on one thread); the
captions are drawn afresh every time a scene is used, so the text side never repeats a phrasing pattern per image.

The output directory is what open_clip's ``local-dir:`` loader reads: ``open_clip_config.json`` (``model_cfg``,
``preprocess_cfg`` and an ``mmspec`` section with the word list, training settings and held-out retrieval accuracy)
and ``open_clip_model.safetensors`` (fp16).

CLI: ``python -m mmspec.data_tools.train_clip --out DIR [--steps N] [--batch N] [--pool N] [--seed S]``
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from mmspec import quality
from mmspec.data_tools import gen_world
from mmspec.data_tools.shapes_world import COLOURS, POSITION_PHRASES, SHAPES, Scene

logger = logging.getLogger(__name__)

GROUP = 32  # retrieval is scored among groups of this many held-out pairs
CONTEXT = 32  # the longest prompt_of caption (3 objects, longest template) is 28 tokens with <sot>/<eot>


def render_pool(scenes: Sequence[Scene]) -> torch.Tensor:
    """[N, 3, 32, 32] uint8 renders of the scenes."""
    px = gen_world.IMAGE_PX
    out = torch.empty(len(scenes), 3, px, px, dtype=torch.uint8)
    for i, s in enumerate(tqdm(scenes, desc="render", unit="img", disable=None)):
        im = gen_world.render_textured(s)
        out[i] = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(px, px, 3).permute(2, 0, 1)
    return out


def vocabulary(g: torch.Generator, n: int = 20000) -> list[str]:
    """Every word of n sampled captions plus the world's constants (so rare phrasings are covered too)."""
    caps = [gen_world.prompt_of(gen_world.sample_gen_scene(g), g) for _ in range(n)]
    consts = [*gen_world.TEMPLATES, *POSITION_PHRASES, *SHAPES, *COLOURS,
              *(w for ws in gen_world.SIZE_WORDS.values() for w in ws), "a and"]
    return quality.prompt_words(caps + consts)


def full_config(words: list[str], mean: list[float], std: list[float]) -> dict:
    model_cfg = quality.model_config(len(words) + 4, CONTEXT, gen_world.IMAGE_PX)  # + <pad> <unk> <sot> <eot>
    return {"model_cfg": model_cfg,
            "preprocess_cfg": {"size": gen_world.IMAGE_PX, "mean": mean, "std": std, "interpolation": "bicubic",
                               "resize_mode": "shortest"},
            "mmspec": {"tokenizer": {"type": "word", "words": words}}}


def _normalise(pix: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    return (pix.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def _lr(step: int, steps: int, peak: float) -> float:
    """Linear warm-up over 5 % of the run, then cosine decay to 5 % of the peak."""
    warm = max(1, steps // 20)
    if step < warm:
        return peak * (step + 1) / warm
    t = (step - warm) / max(1, steps - warm)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t)))


@torch.no_grad()
def retrieval(clip: quality.MiniClip, seed: int, n_groups: int) -> dict:
    """Top-1 retrieval among groups of GROUP held-out pairs (a seed the training pool never used)."""
    g = torch.Generator().manual_seed(seed)
    scenes = [gen_world.sample_gen_scene(g) for _ in range(n_groups * GROUP)]
    caps = [gen_world.prompt_of(s, g) for s in scenes]
    img = torch.nn.functional.normalize(clip.encode_images([gen_world.render_textured(s) for s in scenes]), dim=-1)
    txt = torch.nn.functional.normalize(clip.encode_texts(caps), dim=-1)
    t2i = i2t = 0
    for k in range(n_groups):
        sl = slice(k * GROUP, (k + 1) * GROUP)
        sim = txt[sl] @ img[sl].T  # [caption, image]
        target = torch.arange(GROUP)
        t2i += int((sim.argmax(1) == target).sum())
        i2t += int((sim.argmax(0) == target).sum())
    n = n_groups * GROUP
    return {"caption_to_image_top1": round(t2i / n, 4), "image_to_caption_top1": round(i2t / n, 4),
            "group": GROUP, "n_pairs": n, "chance": round(1 / GROUP, 4), "seed": seed}


def train(out: Path, steps: int, batch: int, pool: int, lr: float, seed: int, eval_groups: int) -> dict:
    open_clip = quality._open_clip()
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # open_clip initialises its weights from the global generator
    words = vocabulary(g)
    scenes = [gen_world.sample_gen_scene(g) for _ in range(pool)]
    pix = render_pool(scenes)
    flat = pix.float().div(255).transpose(0, 1).reshape(3, -1)
    mean, std = [round(v, 4) for v in flat.mean(1).tolist()], [round(v, 4) for v in flat.std(1).tolist()]
    cfg = full_config(words, mean, std)
    clip = quality.build_clip(cfg)
    model = clip.model.train()
    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": rest, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.98), eps=1e-6)
    loss_fn = open_clip.ClipLoss()
    order, pos, t0, loss_ema = torch.randperm(pool, generator=g), 0, time.time(), None
    bar = tqdm(range(steps), desc="mini-clip", unit="step", disable=None)
    for step in bar:
        if pos + batch > pool:  # a fresh permutation per epoch: no scene twice in one batch
            order, pos = torch.randperm(pool, generator=g), 0
        idx, pos = order[pos:pos + batch], pos + batch
        caps = [gen_world.prompt_of(scenes[i], g) for i in idx.tolist()]
        for group in opt.param_groups:
            group["lr"] = _lr(step, steps, lr)
        img_f, txt_f, scale = model(_normalise(pix[idx], mean, std), clip.tokenizer(caps))[:3]
        loss = loss_fn(img_f, txt_f, scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():  # CLIP's own clamp: a temperature below 1/100 destabilises training
            model.logit_scale.clamp_(0, math.log(100))
        loss_ema = loss.item() if loss_ema is None else 0.95 * loss_ema + 0.05 * loss.item()
        if step % 25 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{loss_ema:.3f}", scale=f"{model.logit_scale.exp().item():.1f}")
            logger.info("step %d loss %.4f (ema %.4f) logit scale %.1f", step, loss.item(), loss_ema,
                        model.logit_scale.exp().item())
    train_s = time.time() - t0
    model.eval()
    cfg["mmspec"]["training"] = {"steps": steps, "batch": batch, "pool": pool, "lr": lr, "seed": seed,
                                 "final_loss_ema": round(loss_ema, 4), "train_s": round(train_s, 1),
                                 "threads": torch.get_num_threads(), "data": "gen_world.render_textured + prompt_of"}
    cfg["mmspec"]["eval"] = retrieval(clip, seed + 1000, eval_groups)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()},
              str(out / quality.WEIGHTS_FILE))
    (out / quality.CONFIG_FILE).write_text(json.dumps(cfg, indent=1) + "\n", encoding="utf-8")
    logger.info("saved mini-clip to %s: %s", out, cfg["mmspec"]["eval"])
    return cfg


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mmspec.data_tools.train_clip", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(quality.MINI_CLIP_DIR))
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--pool", type=int, default=24000, help="number of pre-rendered training scenes")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-groups", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the dev box shares its 2 cores)")
    args = parser.parse_args(argv)
    if min(args.steps, args.batch, args.pool, args.eval_groups, args.threads) <= 0 or args.batch > args.pool:
        parser.error("steps, batch, pool, eval-groups and threads must be positive, and batch <= pool")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    train(Path(args.out), args.steps, args.batch, args.pool, args.lr, args.seed, args.eval_groups)


if __name__ == "__main__":
    main()
