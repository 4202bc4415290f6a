"""Shapes world: a procedural image-and-text data set that mmspec's built-in mini models are trained on.

No weights or data sets can be downloaded where mmspec must run, so the mini VLM learns a small world it can master:
64x64 RGB scenes with 1-4 flat shapes on a 3x3 grid, and conversations about them (long descriptions, counting,
attribute questions, yes/no questions and two-image comparisons). Question and answer phrasings are drawn from seeded
templates so the text is a distribution, not one string per scene, which is what gives a drafter something to learn.

All randomness comes from a caller-seeded ``torch.Generator`` (never Python's ``random``), so a seed fixes the JSONL
bytes and every PNG. Each example keeps its structured scene, plus a short canonical ``answer`` that ``check_answer``
uses to grade free-form model output.

CLI: ``python -m mmspec.data_tools.shapes_world --n N --out DIR --seed S [--tasks describe,count] [--split-name train]``
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image, ImageDraw
from tqdm import tqdm

from mmspec.errors import InputError

logger = logging.getLogger(__name__)

SIZE_PX = 64
SHAPES = ("circle", "square", "triangle", "diamond", "star", "cross")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "diamond": "diamonds", "star": "stars",
           "cross": "crosses"}
# Pairwise RGB distance >= 80, so every colour name maps to an unmistakable pixel value.
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (245, 220, 40),
           "purple": (150, 60, 190), "orange": (250, 140, 30), "white": (250, 250, 250), "black": (20, 20, 20)}
BACKGROUNDS = {"gray": (128, 128, 128), "beige": (215, 200, 160), "teal": (40, 125, 130), "pink": (240, 175, 195),
               "sky": (150, 195, 235), "navy": (35, 45, 90), "olive": (120, 120, 50), "mint": (170, 225, 190),
               "brown": (120, 80, 50)}
BACKGROUND_STYLES = ("plain", "noise", "gradient")
# A background is only used when it stays this far (RGB distance) from every object colour in the scene; the
# gradient and noise move it by at most ~35, so objects never blend into the background.
MIN_BACKGROUND_DISTANCE = 100.0
SIZES = ("small", "large")
RADIUS = {"small": 6.0, "large": 9.0}  # in 64-px units; a cell is 21.3 px, so jittered shapes never touch
POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
POSITION_PHRASES = ("at the top left", "at the top", "at the top right", "on the left", "in the center",
                    "on the right", "at the bottom left", "at the bottom", "at the bottom right")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TASKS = ("describe", "count", "colour", "shape", "position", "yesno", "compare")
SUPERSAMPLE = 4  # shapes are drawn 4x larger and box-filtered down: smooth edges, exact colours inside


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    size: str
    cell: int  # 0..8, row-major index into POSITIONS
    dx: int = 0  # small pixel jitter of the centre, so positions are not a fixed lattice
    dy: int = 0

    def __post_init__(self):
        if self.shape not in SHAPES or self.colour not in COLOURS or self.size not in SIZES:
            raise InputError(f"unknown shape/colour/size in {self}")
        if not 0 <= self.cell < 9 or max(abs(self.dx), abs(self.dy)) > 1:
            raise InputError(f"cell must be 0..8 and jitter -1..1 in {self}")

    @property
    def position(self) -> str:
        return POSITIONS[self.cell]


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]  # sorted by cell: the canonical order of descriptions
    background: str
    style: str = "plain"
    noise_seed: int = 0  # seeds the per-pixel noise, so render(scene) is a pure function of the scene

    def __post_init__(self):
        cells = [o.cell for o in self.objects]
        if not self.objects or len(set(cells)) != len(cells):
            raise InputError("a scene needs at least one object and at most one object per cell")
        if self.background not in BACKGROUNDS or self.style not in BACKGROUND_STYLES:
            raise InputError(f"unknown background {self.background!r} or style {self.style!r}")
        object.__setattr__(self, "objects", tuple(sorted(self.objects, key=lambda o: o.cell)))

    def to_dict(self) -> dict:
        objs = [{**asdict(o), "position": o.position} for o in self.objects]
        return {"objects": objs, "background": self.background, "style": self.style, "noise_seed": self.noise_seed}

    @classmethod
    def from_dict(cls, d: dict) -> "Scene":
        objs = tuple(Obj(o["shape"], o["colour"], o["size"], o["cell"], o.get("dx", 0), o.get("dy", 0))
                     for o in d["objects"])
        return cls(objs, d["background"], d.get("style", "plain"), d.get("noise_seed", 0))


# ----------------------------------------------------------------------------------------------------------- scenes
def _randint(g: torch.Generator, n: int) -> int:
    return int(torch.randint(n, (1,), generator=g).item())


def _choice(g: torch.Generator, seq: Sequence):
    return seq[_randint(g, len(seq))]


def sample_scene(generator: torch.Generator, n_objects: int | None = None) -> Scene:
    """Draw a scene: 1-4 objects in distinct cells, with a background far from every object colour."""
    g = generator
    n = n_objects if n_objects is not None else 1 + _randint(g, 4)
    cells = torch.randperm(9, generator=g)[:n].tolist()
    objs = tuple(Obj(_choice(g, SHAPES), _choice(g, list(COLOURS)), _choice(g, SIZES), c,
                     _randint(g, 3) - 1, _randint(g, 3) - 1) for c in cells)
    allowed = [b for b, rgb in BACKGROUNDS.items()
               if all(math.dist(rgb, COLOURS[o.colour]) >= MIN_BACKGROUND_DISTANCE for o in objs)]
    return Scene(objs, _choice(g, allowed), _choice(g, BACKGROUND_STYLES), _randint(g, 2**31 - 1))


def cell_centre(obj: Obj) -> tuple[float, float]:
    """(x, y) of the object's centre in 64-px image coordinates."""
    step = SIZE_PX / 3
    return (obj.cell % 3 + 0.5) * step + obj.dx, (obj.cell // 3 + 0.5) * step + obj.dy


def outline(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    """Polygon vertices of a shape of radius r; None for the circle (drawn as an ellipse)."""
    if shape == "square":
        h = 0.82 * r  # a square of the same radius would look much heavier than the circle
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + 0.95 * r, cy + 0.8 * r), (cx - 0.95 * r, cy + 0.8 * r)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + 0.75 * r, cy), (cx, cy + r), (cx - 0.75 * r, cy)]
    if shape == "star":
        return [(cx + (r if k % 2 == 0 else 0.45 * r) * math.sin(k * math.pi / 5),
                 cy - (r if k % 2 == 0 else 0.45 * r) * math.cos(k * math.pi / 5)) for k in range(10)]
    if shape == "cross":
        a, t = r, 0.32 * r
        return [(cx - t, cy - a), (cx + t, cy - a), (cx + t, cy - t), (cx + a, cy - t), (cx + a, cy + t),
                (cx + t, cy + t), (cx + t, cy + a), (cx - t, cy + a), (cx - t, cy + t), (cx - a, cy + t),
                (cx - a, cy - t), (cx - t, cy - t)]
    return None


def _background(scene: Scene) -> torch.Tensor:
    """(64, 64, 3) uint8 background: plain colour, per-pixel noise, or a vertical brightness gradient."""
    base = torch.tensor(BACKGROUNDS[scene.background], dtype=torch.int32).view(1, 1, 3).expand(SIZE_PX, SIZE_PX, 3)
    if scene.style == "noise":
        g = torch.Generator().manual_seed(scene.noise_seed)
        base = base + torch.randint(-12, 13, (SIZE_PX, SIZE_PX, 3), generator=g, dtype=torch.int32)
    elif scene.style == "gradient":
        ramp = torch.linspace(-20, 20, SIZE_PX).round().to(torch.int32).view(SIZE_PX, 1, 1)
        base = base + ramp
    return base.clamp(0, 255).to(torch.uint8)


def _draw_objects(image: Image.Image, scene: Scene, fill=None) -> Image.Image:
    """Draw the scene's objects on a 64x64 image at 4x scale and box-filter back: smooth edges, exact interiors.

    ``fill`` overrides every object's colour (the object mask draws all of them white on black)."""
    big = image.resize((SIZE_PX * SUPERSAMPLE,) * 2, Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(big)
    for o in scene.objects:
        cx, cy = (v * SUPERSAMPLE for v in cell_centre(o))
        r = RADIUS[o.size] * SUPERSAMPLE
        pts, colour = outline(o.shape, cx, cy, r), COLOURS[o.colour] if fill is None else fill
        if pts is None:
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
        else:
            draw.polygon(pts, fill=colour)
    # A box filter averages each 4x4 block: background blocks are uniform, so noise and gradient survive exactly.
    return big.resize((SIZE_PX, SIZE_PX), Image.Resampling.BOX)


def render(scene: Scene) -> Image.Image:
    """Render a scene as a 64x64 RGB PIL image."""
    bg = _background(scene)
    return _draw_objects(Image.frombytes("RGB", (SIZE_PX, SIZE_PX), bytes(bg.flatten().tolist())), scene)


def object_mask(scene: Scene) -> torch.Tensor:
    """(64, 64) float in [0, 1]: how much of each pixel the scene's objects cover, whatever their colours."""
    mask = _draw_objects(Image.new("L", (SIZE_PX, SIZE_PX), 0), scene, fill=255)
    return torch.frombuffer(bytearray(mask.tobytes()), dtype=torch.uint8).view(SIZE_PX, SIZE_PX).float() / 255


# ------------------------------------------------------------------------------------------------------------ text
def _num(n: int) -> str:
    return NUMBER_WORDS[n] if n < len(NUMBER_WORDS) else str(n)


def _noun(n: int, singular: str, plural: str) -> str:
    return f"{_num(n)} {singular if n == 1 else plural}"


def _join(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _count_answer(g: torch.Generator, n: int, singular: str, plural: str, suffix: str = "") -> str:
    style = _randint(g, 3)
    if style == 0:
        return str(n)
    if style == 1:
        return _cap(_num(n)) + "."
    if n == 0:
        return f"There are no {plural}{suffix}."
    return f"There {'is' if n == 1 else 'are'} {_noun(n, singular, plural)}{suffix}."


def _describe(scene: Scene, g: torch.Generator) -> tuple[str, str]:
    q = _choice(g, ("Describe the image in detail.",
                    "Describe every object in this picture, including its colour, size, shape and position.",
                    "What is in this image? Give a detailed description.",
                    "List all the objects you can see, with their colour, size, shape and position."))
    n = len(scene.objects)
    noun = _noun(n, "object", "objects")
    opening = _choice(g, (f"There {'is' if n == 1 else 'are'} {noun}.", f"The image shows {noun}.",
                          f"I can see {noun} in this image."))
    # One sentence style per answer, as a person would write it: the drafter can learn it from the opening tokens.
    style = _randint(g, 3)
    sentences = [opening]
    for o in scene.objects:
        thing, where = f"{o.size} {o.colour} {o.shape}", POSITION_PHRASES[o.cell]
        sentences.append((f"A {thing} is {where}.", f"{_cap(where)}, there is a {thing}.",
                          f"There is a {thing} {where}.")[style])
    shape_counts = [(s, sum(o.shape == s for o in scene.objects)) for s in SHAPES]
    shapes = [_noun(k, s, PLURALS[s]) for s, k in shape_counts if k]
    colours = [c for c in COLOURS if any(o.colour == c for o in scene.objects)]
    sentences.append(_choice(g, (f"In total: {', '.join(shapes)}; colours: {', '.join(colours)}.",
                                 f"Altogether: {_join(shapes)}, coloured {_join(colours)}.",
                                 f"Summary: {', '.join(shapes)}. Colours: {', '.join(colours)}.")))
    return q, " ".join(sentences)


def _count(scene: Scene, g: torch.Generator) -> tuple[str, str, str]:
    kind = _randint(g, 3)
    if kind == 0:
        n = len(scene.objects)
        q = _choice(g, ("How many objects are there?", "How many objects are in the image?",
                        "Count the objects in this picture."))
        return q, _count_answer(g, n, "object", "objects"), str(n)
    if kind == 1:
        # Mostly shapes that occur (interesting counts), sometimes any shape (zero is a valid answer).
        shape = _choice(g, [o.shape for o in scene.objects]) if _randint(g, 4) else _choice(g, SHAPES)
        n = sum(o.shape == shape for o in scene.objects)
        q = _choice(g, (f"How many {PLURALS[shape]} are there?", f"How many {PLURALS[shape]} can you see?"))
        return q, _count_answer(g, n, shape, PLURALS[shape]), str(n)
    colour = _choice(g, [o.colour for o in scene.objects]) if _randint(g, 4) else _choice(g, list(COLOURS))
    n = sum(o.colour == colour for o in scene.objects)
    q = _choice(g, (f"How many {colour} objects are there?", f"How many objects are {colour}?"))
    return q, _count_answer(g, n, f"{colour} object", f"{colour} objects"), str(n)


def _colour(scene: Scene, g: torch.Generator) -> tuple[str, str, str]:
    o = _choice(g, scene.objects)
    # Naming the shape alone is only well-defined when it occurs once; the position always pins the object down.
    unique = sum(p.shape == o.shape for p in scene.objects) == 1
    ref = o.shape if unique and _randint(g, 2) else f"{o.shape} {POSITION_PHRASES[o.cell]}"
    q = _choice(g, (f"What colour is the {ref}?", f"Which colour does the {ref} have?",
                    f"What is the colour of the {ref}?"))
    a = _choice(g, (o.colour, f"{_cap(o.colour)}.", f"It is {o.colour}.", f"The {o.shape} is {o.colour}."))
    return q, a, o.colour


def _shape(scene: Scene, g: torch.Generator) -> tuple[str, str, str]:
    o = _choice(g, scene.objects)
    unique = sum(p.colour == o.colour for p in scene.objects) == 1
    ref = f"the {o.colour} object" if unique and _randint(g, 2) else f"the object {POSITION_PHRASES[o.cell]}"
    q = _choice(g, (f"What shape is {ref}?", f"Which shape is {ref}?", f"What kind of shape is {ref}?"))
    a = _choice(g, (o.shape, f"A {o.shape}.", f"It is a {o.shape}.", f"It is a {o.size} {o.shape}."))
    return q, a, o.shape


def _position(scene: Scene, g: torch.Generator) -> tuple[str, str, str]:
    o = _choice(g, scene.objects)
    # Two objects may share colour and shape: then the question is plural and the answer lists every position.
    where = [p.cell for p in scene.objects if (p.shape, p.colour) == (o.shape, o.colour)]
    key = " and ".join(POSITIONS[c] for c in where)
    if len(where) == 1:
        thing = f"{o.colour} {o.shape}"
        q = _choice(g, (f"Where is the {thing}?", f"In which part of the image is the {thing}?",
                        f"Where can you find the {thing}?"))
        a = _choice(g, (POSITIONS[o.cell], f"It is {POSITION_PHRASES[o.cell]}.",
                        f"The {thing} is {POSITION_PHRASES[o.cell]}."))
    else:
        thing = f"{o.colour} {PLURALS[o.shape]}"
        q = _choice(g, (f"Where are the {thing}?", f"In which parts of the image are the {thing}?"))
        phrases = _join([POSITION_PHRASES[c] for c in where])
        a = _choice(g, (_join([POSITIONS[c] for c in where]), f"They are {phrases}.", f"The {thing} are {phrases}."))
    return q, a, key


def _yesno(scene: Scene, g: torch.Generator) -> tuple[str, str, str]:
    yes = bool(_randint(g, 2))  # balanced answers, decided before the question so the prior is exactly 1/2
    if _randint(g, 2):
        present = {(o.colour, o.shape) for o in scene.objects}
        if yes:
            colour, shape = _choice(g, sorted(present))
        else:
            # Hard negatives most of the time: right shape with a wrong colour, or right colour with a wrong shape.
            o, mode = _choice(g, scene.objects), _randint(g, 3)
            cands = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present
                     and (mode == 2 or (mode == 0 and s == o.shape) or (mode == 1 and c == o.colour))]
            colour, shape = _choice(g, cands)
        thing = f"{colour} {shape}"
        q = _choice(g, (f"Is there a {thing}?", f"Does the image contain a {thing}?", f"Can you see a {thing}?"))
    else:
        if yes:
            o = _choice(g, scene.objects)
            shape, cell = o.shape, o.cell
        else:
            cell = _randint(g, 9)
            there = [o.shape for o in scene.objects if o.cell == cell]
            shape = _choice(g, [s for s in SHAPES if s not in there])
        thing = f"{shape} {POSITION_PHRASES[cell]}"
        q = _choice(g, (f"Is there a {thing}?", f"Is there a {shape} {POSITION_PHRASES[cell]} of the image?"))
    word = "yes" if yes else "no"
    a = _choice(g, (word, f"{_cap(word)}.", f"Yes, there is a {thing}." if yes else f"No, there is no {thing}."))
    return q, a, word


def _compare(scenes: Sequence[Scene], g: torch.Generator) -> tuple[str, str, str]:
    s1, s2 = scenes
    n1, n2 = len(s1.objects), len(s2.objects)
    kind = _randint(g, 3)
    if kind == 0:
        q = _choice(g, ("Which image has more objects?", "Which of the two images contains more objects?"))
        if n1 == n2:
            a = _choice(g, ("Both images have the same number of objects.",
                            f"Neither; both images have {_noun(n1, 'object', 'objects')}."))
            return q, a, "same"
        which = "first" if n1 > n2 else "second"
        a = _choice(g, (f"The {which} image.", f"The {which} one.",
                        f"The {which} image has more objects ({_num(max(n1, n2))} versus {_num(min(n1, n2))})."))
        return q, a, which
    if kind == 1:
        both = sorted({o.shape for o in s1.objects} & {o.shape for o in s2.objects}, key=SHAPES.index)
        shape = _choice(g, both) if both and _randint(g, 2) else _choice(g, SHAPES)
        in1, in2 = (any(o.shape == shape for o in s.objects) for s in (s1, s2))
        q = _choice(g, (f"Do both images contain a {shape}?", f"Is there a {shape} in both images?"))
        if in1 and in2:
            a = _choice(g, ("Yes.", f"Yes, both images contain a {shape}."))
        elif in1 or in2:
            a = _choice(g, ("No.", f"No, only the {'first' if in1 else 'second'} image contains a {shape}."))
        else:
            a = _choice(g, ("No.", f"No, neither image contains a {shape}."))
        return q, a, "yes" if in1 and in2 else "no"
    q = _choice(g, ("How many objects are there in the two images together?",
                    "How many objects do the two images contain in total?"))
    return q, _count_answer(g, n1 + n2, "object", "objects", " in total"), str(n1 + n2)


_SINGLE = {"count": _count, "colour": _colour, "shape": _shape, "position": _position, "yesno": _yesno}


def make_example(scenes: Scene | Sequence[Scene], task: str, generator: torch.Generator,
                 image_paths: Sequence[str] | None = None) -> dict:
    """One conversation about a scene (two scenes for ``compare``), in mmspec's training-JSONL format.

    Returns {"images", "messages", "task", "scene", "answer"}: ``answer`` is the short canonical fact the assistant
    turn states (a number, colour, shape, position(s), yes/no, first/second/same), used by ``check_answer``.
    ``images`` is ``image_paths`` (empty when not given; ``make_dataset`` fills it).
    """
    if task not in TASKS:
        raise InputError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    scenes = (scenes,) if isinstance(scenes, Scene) else tuple(scenes)
    if len(scenes) != (2 if task == "compare" else 1):
        raise InputError(f"task {task!r} takes {'two scenes' if task == 'compare' else 'one scene'}")
    if task == "describe":
        q, a = _describe(scenes[0], generator)
        key = ""
    elif task == "compare":
        q, a, key = _compare(scenes, generator)
    else:
        q, a, key = _SINGLE[task](scenes[0], generator)
    scene_field = [s.to_dict() for s in scenes] if task == "compare" else scenes[0].to_dict()
    return {"images": list(image_paths or []),
            "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
            "task": task, "scene": scene_field, "answer": key}


# --------------------------------------------------------------------------------------------------------- grading
_NUM_RE = re.compile(r"\b(\d+|" + "|".join(NUMBER_WORDS) + r"|no)\b", re.IGNORECASE)
_POS_RE = re.compile(r"\b(" + "|".join(sorted(POSITIONS, key=len, reverse=True)) + r")\b", re.IGNORECASE)
_OBJ_RE = re.compile(rf"\b({'|'.join(SIZES)}) ({'|'.join(COLOURS)}) ({'|'.join(SHAPES)})\b", re.IGNORECASE)


def parse_count(text: str) -> int | None:
    """The first number in an answer ("3", "three", "There are no stars" -> 0), or None."""
    m = _NUM_RE.search(text)
    if m is None:
        return None
    w = m.group(1).lower()
    return int(w) if w.isdigit() else 0 if w == "no" else NUMBER_WORDS.index(w)


def parse_description(text: str) -> set[tuple[str, str, str, str]]:
    """(size, colour, shape, position) of every object sentence in a description."""
    found = set()
    for sentence in re.split(r"(?<=\.)\s+", text):
        obj, pos = _OBJ_RE.search(sentence), _POS_RE.search(sentence)
        if obj and pos:
            found.add((*(x.lower() for x in obj.groups()), pos.group(1).lower()))
    return found


def check_answer(example: dict, text: str) -> bool:
    """Whether a free-form answer (e.g. a model's output) states the same fact as the example's reference answer."""
    task, key, t = example["task"], example["answer"], text.strip().lower()
    if task == "describe":
        scene = Scene.from_dict(example["scene"])
        return parse_description(text) == {(o.size, o.colour, o.shape, o.position) for o in scene.objects}
    if task == "count" or (task == "compare" and key.isdigit()):
        return parse_count(t) == int(key)
    if task == "colour":
        return [c for c in COLOURS if re.search(rf"\b{c}\b", t)] == [key]
    if task == "shape":
        return [s for s in SHAPES if re.search(rf"\b{s}\b", t)] == [key]
    if task == "position":
        return " and ".join(m.lower() for m in _POS_RE.findall(t)) == key
    if key in ("yes", "no"):
        return t.split(" ", 1)[0].strip(".,;!") == key
    said = "same" if ("same" in t or "neither" in t) else "first" if "first" in t else "second" if "second" in t else ""
    return said == key


# ---------------------------------------------------------------------------------------------------------- dataset
def make_dataset(n: int, out_dir: str | Path, seed: int, tasks: Sequence[str] | None = None,
                 split: str = "train") -> Path:
    """Write n examples to out_dir/<split>.jsonl and their PNGs under out_dir/images/; returns the JSONL path.

    Image paths in the JSONL are relative to its directory. The same seed gives byte-identical output.
    """
    tasks = tuple(tasks) if tasks else TASKS
    bad = [t for t in tasks if t not in TASKS]
    if n <= 0 or bad:
        raise InputError(f"need n > 0 and tasks from {', '.join(TASKS)}; got n={n}, unknown tasks {bad}")
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    path = out_dir / f"{split}.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for i in tqdm(range(n), desc=f"shapes world {split}", unit="ex", disable=None):
            task = _choice(g, tasks)
            scenes = [sample_scene(g) for _ in range(2 if task == "compare" else 1)]
            names = [f"images/{split}_{i:06d}.png"] if len(scenes) == 1 else \
                [f"images/{split}_{i:06d}_{k}.png" for k in (1, 2)]
            for scene, name in zip(scenes, names):
                render(scene).save(out_dir / name, format="PNG")
            f.write(json.dumps(make_example(scenes, task, g, names)) + "\n")
    logger.info("wrote %d shapes-world examples to %s", n, path)
    return path


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mmspec.data_tools.shapes_world",
                                     description="Generate the procedural shapes-world data set.")
    parser.add_argument("--n", type=int, required=True, help="number of examples")
    parser.add_argument("--out", required=True, help="output directory (images/ and <split>.jsonl)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated subset of {','.join(TASKS)}")
    parser.add_argument("--split-name", default="train", help="name of the JSONL file and image prefix")
    args = parser.parse_args(argv)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if args.n <= 0:
        parser.error(f"--n must be positive, got {args.n}")
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        parser.error(f"unknown task(s) {','.join(unknown) or '(none given)'}; choose from {','.join(TASKS)}")
    if not re.fullmatch(r"[\w.-]+", args.split_name):
        parser.error(f"--split-name must be a plain file name, got {args.split_name!r}")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        path = make_dataset(args.n, args.out, args.seed, tasks, args.split_name)
    except OSError as e:
        parser.error(f"cannot write to {args.out}: {e.strerror or e}")
    print(path)


if __name__ == "__main__":
    main()
