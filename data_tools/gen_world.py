"""The text-to-image side of the shapes world: textured 32x32 scenes and the prompts that describe them.

mini-gen (the built-in Janus-style image generator) learns to draw these from prompts such as "a small red circle at
the top left and a big blue square in the center". The scenes are shapes-world ``Scene`` objects (1-3 shapes on the
3x3 grid), but drawn with texture on purpose: a gradient background with per-pixel noise and objects shaded by a
brightness ramp plus noise. Speculative decoding with LANTERN relaxed acceptance (Jang et al., ICLR 2025) is about
images whose VQ codes are near-interchangeable; flat-colour scenes would give a target that is almost certain of every
code and leave a relaxed rule nothing to relax.

Every random draw comes from a caller-seeded ``torch.Generator``; ``render_textured`` seeds its noise from
``scene.noise_seed``, so an image is a pure function of its scene.

CLI: ``python -m mmspec.data_tools.gen_world --n N --out DIR --seed S [--split train]``
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image, ImageDraw
from tqdm import tqdm

from mmspec.errors import InputError

from .shapes_world import (BACKGROUNDS, COLOURS, MIN_BACKGROUND_DISTANCE, POSITION_PHRASES, SHAPES, SIZES, RADIUS,
                           Obj, Scene, cell_centre, outline)

logger = logging.getLogger(__name__)

IMAGE_PX = 32  # mini-gen's images; the deep mini-gen draws at RENDER_PX (issue #23: 16 x 16 codes)
RENDER_PX = 64  # shapes-world geometry is in 64-px units; the texture noise is added after any box downsample
SUPERSAMPLE = 4  # object masks are drawn at 256 px and box-filtered to 64: smooth edges
MAX_OBJECTS = 3
GRADIENT = 28.0  # half the background's brightness swing along a random direction, in 0-255 units
SHADE = 0.15  # objects are shaded by +-15 % brightness across their width: yellow stays yellow, not olive
BG_NOISE, OBJ_NOISE = 9.0, 11.0  # per-pixel Gaussian noise (0-255 units) at the image's resolution
SIZE_WORDS = {"small": ("small",), "large": ("big", "large")}
TEMPLATES = ("{}", "an image of {}", "a picture with {}", "draw {}", "{} on a textured background")


def _randint(g: torch.Generator, n: int) -> int:
    return int(torch.randint(n, (1,), generator=g).item())


def _choice(g: torch.Generator, seq: Sequence):
    return seq[_randint(g, len(seq))]


def sample_gen_scene(g: torch.Generator) -> Scene:
    """1-3 objects in distinct cells on a background far from every object colour (as shapes world picks it)."""
    n = 1 + _randint(g, MAX_OBJECTS)
    cells = torch.randperm(9, generator=g)[:n].tolist()
    objs = tuple(Obj(_choice(g, SHAPES), _choice(g, list(COLOURS)), _choice(g, SIZES), c,
                     _randint(g, 3) - 1, _randint(g, 3) - 1) for c in cells)
    allowed = [b for b, rgb in BACKGROUNDS.items()
               if all(math.dist(rgb, COLOURS[o.colour]) >= MIN_BACKGROUND_DISTANCE for o in objs)]
    # style "gradient" records what render_textured always draws (gradient and noise), for shapes-world tools
    return Scene(objs, _choice(g, allowed), "gradient", _randint(g, 2**31 - 1))


def _object_alpha(obj: Obj) -> torch.Tensor:
    """(64, 64) float coverage of one object, drawn at 4x and box-filtered down."""
    big = Image.new("L", (RENDER_PX * SUPERSAMPLE,) * 2, 0)
    draw = ImageDraw.Draw(big)
    cx, cy = (v * SUPERSAMPLE for v in cell_centre(obj))
    r = RADIUS[obj.size] * SUPERSAMPLE
    pts = outline(obj.shape, cx, cy, r)
    if pts is None:
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    else:
        draw.polygon(pts, fill=255)
    small = big.resize((RENDER_PX, RENDER_PX), Image.Resampling.BOX)
    return torch.frombuffer(bytearray(small.tobytes()), dtype=torch.uint8).view(RENDER_PX, RENDER_PX).float() / 255


def _ramp(g: torch.Generator, cx: float, cy: float, scale: float) -> torch.Tensor:
    """(64, 64) values in about [-1, 1] rising along a random direction through (cx, cy) over +-scale pixels."""
    angle = float(torch.rand((), generator=g)) * 2 * math.pi
    ys, xs = torch.meshgrid(torch.arange(RENDER_PX, dtype=torch.float32) + 0.5,
                            torch.arange(RENDER_PX, dtype=torch.float32) + 0.5, indexing="ij")
    return (((xs - cx) * math.cos(angle) + (ys - cy) * math.sin(angle)) / scale).clamp(-1, 1)


def render_textured(scene: Scene, px: int = IMAGE_PX) -> Image.Image:
    """Render ``scene`` as a px x px RGB image (px divides 64): gradient + noise background, shaded noisy objects."""
    g = torch.Generator().manual_seed(scene.noise_seed)
    half = RENDER_PX / 2
    base = torch.tensor(BACKGROUNDS[scene.background], dtype=torch.float32).view(3, 1, 1)
    img = base + GRADIENT * _ramp(g, half, half, half * math.sqrt(2))
    obj_cover = torch.zeros(RENDER_PX, RENDER_PX)
    for o in scene.objects:
        alpha = _object_alpha(o)
        cx, cy = cell_centre(o)
        shade = 1.0 + SHADE * _ramp(g, cx, cy, RADIUS[o.size])
        colour = torch.tensor(COLOURS[o.colour], dtype=torch.float32).view(3, 1, 1) * shade
        img = img * (1 - alpha) + colour * alpha
        obj_cover = torch.maximum(obj_cover, alpha)
    # box downsample first, then noise at the image's resolution: noise added before it would be averaged away.
    img = _box_down(img, px)
    sigma = BG_NOISE + (OBJ_NOISE - BG_NOISE) * _box_down(obj_cover[None], px)
    img = img + sigma * torch.randn(3, px, px, generator=g)
    arr = img.round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).contiguous()
    return Image.frombytes("RGB", (px, px), arr.numpy().tobytes())


def _box_down(x: torch.Tensor, px: int) -> torch.Tensor:
    """[C, 64, 64] -> [C, px, px] by box filter (px must divide 64)."""
    if RENDER_PX % px:
        raise InputError(f"image size must divide {RENDER_PX} px, got {px}")
    return torch.nn.functional.avg_pool2d(x.unsqueeze(0), RENDER_PX // px)[0]


def object_mask(scene: Scene, px: int = IMAGE_PX) -> torch.Tensor:
    """(px, px) float in [0, 1]: object coverage at the image's resolution (weights the VQ's reconstruction loss)."""
    cover = torch.zeros(RENDER_PX, RENDER_PX)
    for o in scene.objects:
        cover = torch.maximum(cover, _object_alpha(o))
    return _box_down(cover[None], px)[0]


def _phrase(o: Obj, g: torch.Generator) -> str:
    return f"a {_choice(g, SIZE_WORDS[o.size])} {o.colour} {o.shape} {POSITION_PHRASES[o.cell]}"


def prompt_of(scene: Scene, g: torch.Generator) -> str:
    """One phrase per object in raster (cell) order, the order the image's codes are generated in, e.g.
    "a small red circle at the top left and a big blue square in the center"; a seeded template wraps it."""
    phrases = [_phrase(o, g) for o in scene.objects]
    body = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    return _choice(g, TEMPLATES).format(body)


def expected_answers(scene: Scene) -> dict:
    """What a faithful image shows: ``{"count": number of objects, "colours": set of colour names}``."""
    return {"count": len(scene.objects), "colours": {o.colour for o in scene.objects}}


def make_gen_dataset(n: int, out_dir: str | Path, seed: int, split: str = "train", px: int = IMAGE_PX) -> Path:
    """Write n examples to out_dir/<split>.jsonl (``{"prompt", "scene", "image"}``, image paths relative to
    out_dir) with their PNGs under out_dir/images/, plus out_dir/<split>_prompts.jsonl holding ``{"prompt"}`` lines
    (the form ``mmspec train-drafter`` reads for an image target). Returns the first path; same seed, same bytes."""
    if n <= 0:
        raise InputError(f"need n > 0, got {n}")
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    path = out_dir / f"{split}.jsonl"
    # Rendering is thousands of tiny tensor ops: one thread is ~6x faster than two fighting over a busy 2-core CPU.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _write_split(n, out_dir, split, g, path, px)
    finally:
        torch.set_num_threads(threads)
    logger.info("wrote %d gen-world examples to %s", n, path)
    return path


def _write_split(n: int, out_dir: Path, split: str, g: torch.Generator, path: Path, px: int) -> None:
    with open(path, "w", encoding="utf-8") as f, open(out_dir / f"{split}_prompts.jsonl", "w", encoding="utf-8") as fp:
        for i in tqdm(range(n), desc=f"gen world {split}", unit="ex", disable=None):
            scene = sample_gen_scene(g)
            prompt, name = prompt_of(scene, g), f"images/{split}_{i:06d}.png"
            render_textured(scene, px).save(out_dir / name, format="PNG")
            f.write(json.dumps({"prompt": prompt, "scene": scene.to_dict(), "image": name}) + "\n")
            fp.write(json.dumps({"prompt": prompt}) + "\n")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mmspec.data_tools.gen_world",
                                     description="Generate textured shapes-world prompt/image pairs.")
    parser.add_argument("--n", type=int, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split", default="train")
    args = parser.parse_args(argv)
    if args.n <= 0:
        parser.error(f"--n must be positive, got {args.n}")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logger.info("%s", make_gen_dataset(args.n, args.out, args.seed, args.split))


if __name__ == "__main__":
    main()
