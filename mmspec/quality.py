"""Built-in image-quality measures for the AR image-generation bench: CLIPScore, a CLIP-feature FID and faithfulness.

Nothing can be downloaded where mmspec runs, so the usual feature extractors (Inception for FID, OpenAI CLIP for
CLIPScore) are out of reach. mmspec instead ships ``mini-clip``, a small CLIP trained contrastively on the same
textured shapes world that mini-gen draws (``data_tools/train_clip.py``), and judges faithfulness with the built-in
mini-vlm, which answers counting questions about each image. All three measures are deterministic: no sampling,
models in eval mode, fixed question order.

    clip = load_clip()
    clip_score(images, prompts, clip)        # mean 100 * max(cos, 0), the torchmetrics CLIPScore convention
    fid(gen_images, ref_images, clip)        # Frechet distance between mini-clip image embeddings
    faithfulness(images, scenes)             # share of images whose count and colours mini-vlm confirms
    validate_judge(n)                        # the judge's own accuracy on rendered scenes (the ceiling of the above)
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
from PIL import Image, ImageFilter
from tqdm import tqdm

from mmspec.data_tools import gen_world
from mmspec.data_tools.shapes_world import COLOURS, Scene, parse_count
from mmspec.errors import InputError, InputTypeError, MissingInputError

logger = logging.getLogger(__name__)

MINI_CLIP_DIR = Path(__file__).resolve().parent / "models" / "mini-clip"
CONFIG_FILE = "open_clip_config.json"  # the names open_clip's own "local-dir:" loader looks for
WEIGHTS_FILE = "open_clip_model.safetensors"
PAD, UNK, SOT, EOT = "<pad>", "<unk>", "<sot>", "<eot>"
JUDGE_PX = 64  # mini-vlm was trained on 64-px shapes-world renders
# The judge's view of a 32-px image: a 3x3 median (removes the per-pixel texture noise mini-vlm never saw, which made
# it count noise as objects; blobs of 3x3 px and up survive) and a bilinear upscale, the best view on count accuracy
# (the measured table is in docs/quality.md).
JUDGE_MEDIAN = 3
JUDGE_RESAMPLE = Image.Resampling.BILINEAR
BATCH = 256


# ------------------------------------------------------------------------------------------------------ tokenizer
class WordTokenizer:
    """A closed-vocabulary word tokenizer: ``<sot> word ... <eot> <pad>...`` in ``context_length`` ids.

    The shapes-world prompt language has well under a hundred words, so open_clip's 49k-entry BPE would spend over 85 %
    of mini-clip's weights on an embedding table whose rows are never trained. ``<eot>`` takes the highest id because
    open_clip's text tower pools at ``text.argmax(-1)`` (its default ``argmax`` pooling); an unknown word maps to
    ``<unk>`` so foreign prompts still encode (and score low) instead of failing.
    """

    def __init__(self, words: Sequence[str], context_length: int):
        words = [w for w in words if w not in (PAD, UNK, SOT, EOT)]
        if len(set(words)) != len(words):
            raise InputError("tokenizer words must be unique")
        self.vocab = [PAD, UNK, SOT, *words, EOT]
        self.ids = {w: i for i, w in enumerate(self.vocab)}
        self.context_length = context_length

    @staticmethod
    def split(text: str) -> list[str]:
        """Lower-cased words and numbers; punctuation carries nothing in prompts of this world."""
        return re.findall(r"[a-z]+|\d+", text.lower())

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        """[len(texts), context_length] long ids; a prompt that is too long is cut, keeping its ``<eot>``."""
        out = torch.zeros(len(texts), self.context_length, dtype=torch.long)  # <pad> is id 0
        unk = self.ids[UNK]
        for row, text in enumerate(texts):
            ids = [self.ids[SOT], *(self.ids.get(w, unk) for w in self.split(text))][: self.context_length - 1]
            ids.append(self.ids[EOT])
            out[row, : len(ids)] = torch.tensor(ids)
        return out


def prompt_words(prompts: Iterable[str]) -> list[str]:
    """The sorted word list of a prompt corpus: the vocabulary ``WordTokenizer`` is built from."""
    return sorted({w for p in prompts for w in WordTokenizer.split(p)})


# ----------------------------------------------------------------------------------------------------- mini-clip
def model_config(vocab_size: int, context_length: int = 32, image_px: int = 32) -> dict:
    """open_clip ``model_cfg`` of mini-clip: a 4-px-patch ViT (an 8x8 grid, so each of the 3x3 scene cells spans
    several patches and positions stay separable) and a small causal text transformer."""
    return {"embed_dim": 128,
            "vision_cfg": {"image_size": image_px, "patch_size": 4, "width": 128, "layers": 3, "head_width": 32,
                           "mlp_ratio": 2.0},
            "text_cfg": {"context_length": context_length, "vocab_size": vocab_size, "width": 128, "heads": 4,
                         "layers": 3, "mlp_ratio": 2.0}}


@dataclass
class MiniClip:
    """An open_clip CLIP with its tokenizer and preprocessing; ``info`` holds training and evaluation records."""

    model: torch.nn.Module
    tokenizer: WordTokenizer
    image_px: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    info: dict

    def pixels(self, images: Sequence[Any]) -> torch.Tensor:
        """[N, 3, px, px] normalised float pixels; images of another size are resized (bicubic, as open_clip)."""
        return images_to_tensor(images, self.image_px, self.mean, self.std)

    @torch.no_grad()
    def encode_images(self, images: Sequence[Any]) -> torch.Tensor:
        """[N, embed_dim] float32 image embeddings (projected, not normalised)."""
        self.model.eval()
        parts = [self.model.encode_image(self.pixels(images[i:i + BATCH])) for i in range(0, len(images), BATCH)]
        return torch.cat(parts).float()

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """[N, embed_dim] float32 text embeddings (projected, not normalised)."""
        self.model.eval()
        parts = [self.model.encode_text(self.tokenizer(texts[i:i + BATCH])) for i in range(0, len(texts), BATCH)]
        return torch.cat(parts).float()


def as_rgb(image: Any) -> Image.Image:
    """A PIL RGB image from a PIL image, a path or an HxWxC uint8 array (the forms mmspec accepts everywhere)."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, (str, Path)):
        if not Path(image).is_file():
            raise MissingInputError(f"image file {image} not found")
        return Image.open(image).convert("RGB")
    if hasattr(image, "shape") and len(image.shape) == 3:
        arr = image.numpy() if isinstance(image, torch.Tensor) else image
        return Image.fromarray(arr.astype("uint8")).convert("RGB")
    raise InputTypeError(f"an image must be a PIL image, a path or an HxWxC uint8 array, got {type(image).__name__}")


def images_to_tensor(images: Sequence[Any], px: int, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """[N, 3, px, px] float: RGB in [0, 1], resized to px when needed, normalised by mean/std."""
    out = torch.empty(len(images), 3, px, px)
    for i, image in enumerate(images):
        im = as_rgb(image)
        if im.size != (px, px):
            im = im.resize((px, px), Image.Resampling.BICUBIC)
        out[i] = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(px, px, 3).permute(2, 0, 1)
    out /= 255.0
    return (out - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def _open_clip():
    try:
        import open_clip
    except ImportError as e:
        raise MissingInputError("mmspec.quality needs open_clip, a dependency of mmspec: pip install 'open_clip_torch>=3.0'") from e
    return open_clip


def build_clip(cfg: Mapping, weights_dir: str | Path | None = None) -> MiniClip:
    """A ``MiniClip`` from a full config (``model_cfg``, ``preprocess_cfg``, ``mmspec``): random weights when
    ``weights_dir`` is None, else open_clip's own ``local-dir:`` loader reads the directory's config and weights."""
    open_clip = _open_clip()
    if weights_dir is None:
        model = open_clip.CLIP(**cfg["model_cfg"])  # the class create_model instantiates for this config
    else:
        model = open_clip.create_model(f"local-dir:{weights_dir}", precision="fp32", device="cpu")
    model.eval()
    tok = cfg["mmspec"]["tokenizer"]
    pre = cfg["preprocess_cfg"]
    return MiniClip(model, WordTokenizer(tok["words"], cfg["model_cfg"]["text_cfg"]["context_length"]),
                    int(pre["size"]), tuple(pre["mean"]), tuple(pre["std"]), dict(cfg["mmspec"]))


def load_clip(path: str | Path | None = None) -> MiniClip:
    """Load mini-clip (default: the copy shipped in mmspec/models/mini-clip); a clear error when it is missing."""
    d = Path(path) if path is not None else MINI_CLIP_DIR
    missing = [f for f in (CONFIG_FILE, WEIGHTS_FILE) if not (d / f).is_file()]
    if missing:
        raise MissingInputError(f"mini-clip not found: {d} lacks {', '.join(missing)}; build it with "
                                "`python -m mmspec.data_tools.train_clip --out DIR` (mmspec never downloads)")
    cfg = json.loads((d / CONFIG_FILE).read_text(encoding="utf-8"))
    if "mmspec" not in cfg or "tokenizer" not in cfg["mmspec"]:
        raise InputError(f"{d / CONFIG_FILE} is not a mini-clip config (no mmspec.tokenizer section)")
    return build_clip(cfg, d)


_DEFAULT_CLIP: MiniClip | None = None


def _clip(clip: MiniClip | None) -> MiniClip:
    """The caller's CLIP, else the shipped mini-clip, loaded once per process."""
    global _DEFAULT_CLIP
    if clip is not None:
        return clip
    if _DEFAULT_CLIP is None:
        _DEFAULT_CLIP = load_clip()
    return _DEFAULT_CLIP


# ------------------------------------------------------------------------------------------------ CLIPScore / FID
def clip_score(images: Sequence[Any], prompts: Sequence[str], clip: MiniClip | None = None) -> float:
    """Mean CLIPScore of (image, prompt) pairs with mini-clip: 100 * max(cos, 0), the torchmetrics convention
    (Hessel et al. 2021 use 2.5 * max(cos, 0); multiply by 0.025 to compare). Range 0-100, higher is better."""
    if len(images) != len(prompts) or not images:
        raise InputError(f"clip_score needs as many prompts as images (>= 1), got {len(images)} and {len(prompts)}")
    clip = _clip(clip)
    img = torch.nn.functional.normalize(clip.encode_images(images), dim=-1)
    txt = torch.nn.functional.normalize(clip.encode_texts(prompts), dim=-1)
    return float(100 * (img * txt).sum(-1).clamp(min=0).mean())


def _sqrt_psd(m: torch.Tensor) -> torch.Tensor:
    """Square root of a symmetric PSD matrix [D, D] through eigh; rounding's tiny negative eigenvalues are zeroed."""
    vals, vecs = torch.linalg.eigh((m + m.T) / 2)
    return (vecs * vals.clamp(min=0).sqrt()) @ vecs.T


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to feature sets a [N, D] and b [M, D] (Heusel et al. 2017):
    |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)).

    tr((S_a S_b)^(1/2)) is computed as tr((S_a^(1/2) S_b S_a^(1/2))^(1/2)), a symmetric PSD matrix, with eigh in
    float64: unlike scipy's sqrtm on the non-symmetric product it never goes complex, and it stays exact when a
    covariance is singular, which it is whenever there are fewer samples than feature dimensions (the usual case in
    a CPU bench). With few samples FID is biased upwards; compare only values computed with the same N."""
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise InputError(f"frechet_distance needs two [N>=2, D] feature sets, got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = torch.cov(a.T).reshape(a.shape[1], -1), torch.cov(b.T).reshape(b.shape[1], -1)
    root_a = _sqrt_psd(s_a)
    cross = torch.linalg.eigvalsh(root_a @ s_b @ root_a).clamp(min=0).sqrt().sum()
    d = (mu_a - mu_b).square().sum() + torch.trace(s_a) + torch.trace(s_b) - 2 * cross
    return max(0.0, float(d))


def fid(gen_images: Sequence[Any], ref_images: Sequence[Any], clip: MiniClip | None = None) -> float:
    """FID between generated and reference (rendered) images on mini-clip's image embeddings (the projected
    embedding, before CLIP's l2 normalisation), not Inception features: values are comparable only with each other."""
    clip = _clip(clip)
    return frechet_distance(clip.encode_images(gen_images), clip.encode_images(ref_images))


# -------------------------------------------------------------------------------------------------- faithfulness
COUNT_QUESTION = "How many objects are there?"
COLOUR_QUESTION = "How many {} objects are there?"  # a shapes-world count question form mini-vlm was trained on
MAX_ANSWER_TOKENS = 10  # "There are three red objects." and shorter


def expected_of(item: Any) -> dict:
    """{"count": int, "colours": set} from a shapes-world Scene or an ``expected_answers``-style dict."""
    if isinstance(item, Scene):
        return {"count": len(item.objects), "colours": {o.colour for o in item.objects}}
    if isinstance(item, Mapping) and "count" in item and "colours" in item:
        colours = set(item["colours"])
        if not colours <= set(COLOURS):
            raise InputError(f"unknown colour(s) {sorted(colours - set(COLOURS))}; choose from {', '.join(COLOURS)}")
        return {"count": int(item["count"]), "colours": colours}
    raise InputTypeError(f"expected a Scene or a {{'count', 'colours'}} dict, got {type(item).__name__}")


def for_judge(image: Any) -> Image.Image:
    """The judge's view: RGB at 64 px. Generated and rendered 32-px images go through the same median filter and
    upscale, so whatever bias that view has is the same for both sides of a comparison."""
    im = as_rgb(image)
    if im.size == (JUDGE_PX, JUDGE_PX):
        return im
    return im.filter(ImageFilter.MedianFilter(JUDGE_MEDIAN)).resize((JUDGE_PX, JUDGE_PX), JUDGE_RESAMPLE)


_DEFAULT_JUDGE = None


def load_judge():
    """The built-in mini-vlm pipeline (loaded once per process)."""
    global _DEFAULT_JUDGE
    if _DEFAULT_JUDGE is None:
        import mmspec

        _DEFAULT_JUDGE = mmspec.load("mini-vlm")
    return _DEFAULT_JUDGE


def _ask(judge, image: Image.Image, question: str) -> int | None:
    # Greedy and non-speculative: short answers gain nothing from drafting, and the text is the same either way.
    res = judge.generate(question, images=[image], max_new_tokens=MAX_ANSWER_TOKENS, temperature=0.0,
                         speculative=False)
    return parse_count(res.text)


def judge_images(images: Sequence[Any], expected: Sequence[Any], judge=None, seed: int = 0,
                 full: bool = False) -> list[dict]:
    """Per image, mini-vlm's verdicts, checked in this order: ``count_ok`` (the object count matches), ``absent_ok``
    (one colour the image should not show, drawn with a generator seeded by ``seed``, gets "How many <colour> objects
    are there?" answered 0), ``colours_ok`` (every expected colour gets that question answered >= 1) and
    ``faithful`` (all three). Unless ``full``, an image stops at its first failed check (later checks are None):
    its verdict is settled, and a poor generator then costs one question per image instead of four or five.

    The absent colour makes the colour check able to fail: an image painted in every colour, or a judge that always
    answers "1", would otherwise pass it. It is drawn for every image whatever the answers, so a seed fixes the
    questions."""
    if len(images) != len(expected) or not images:
        raise InputError(f"need one scene or expected-answers dict per image (>= 1), got {len(expected)} for "
                         f"{len(images)} images")
    judge = judge if judge is not None else load_judge()
    g = torch.Generator().manual_seed(seed)
    records = []
    for image, item in zip(tqdm(images, desc="judge", unit="img", disable=None, leave=False), expected):
        exp, view = expected_of(item), for_judge(image)
        absent = [c for c in COLOURS if c not in exp["colours"]]
        probe = absent[int(torch.randint(len(absent), (1,), generator=g))] if absent else None
        rec = {"count": None, "absent": probe, "absent_count": None, "colours": {},
               "count_ok": None, "absent_ok": None, "colours_ok": None}
        rec["count"] = _ask(judge, view, COUNT_QUESTION)
        rec["count_ok"] = rec["count"] == exp["count"]
        if full or rec["count_ok"]:
            rec["absent_count"] = _ask(judge, view, COLOUR_QUESTION.format(probe)) if probe else 0
            rec["absent_ok"] = rec["absent_count"] == 0
        if full or rec["absent_ok"]:
            for c in sorted(exp["colours"]):
                n = rec["colours"][c] = _ask(judge, view, COLOUR_QUESTION.format(c))
                if not full and (n is None or n < 1):
                    break
            rec["colours_ok"] = all(n is not None and n >= 1 for n in rec["colours"].values())
        rec["faithful"] = bool(rec["count_ok"] and rec["absent_ok"] and rec["colours_ok"])
        records.append(rec)
    return records


def faithfulness(images: Sequence[Any], scenes_or_expected: Sequence[Any], judge=None, seed: int = 0) -> float:
    """Share of images (0-1) that mini-vlm judges faithful to their scene: right object count, a probed absent
    colour absent and every expected colour present (see ``judge_images``). Bounded by the judge's own accuracy on
    rendered scenes, ``validate_judge``."""
    records = judge_images(images, scenes_or_expected, judge, seed)
    return sum(r["faithful"] for r in records) / len(records)


def validate_judge(n: int = 100, seed: int = 0, judge=None) -> dict:
    """The judge's accuracy on n rendered gen-world scenes judged against their own scenes: the ceiling of
    ``faithfulness`` (an image the judge misreads counts as unfaithful however well it is drawn)."""
    if n <= 0:
        raise InputError(f"n must be positive, got {n}")
    g = torch.Generator().manual_seed(seed)
    scenes = [gen_world.sample_gen_scene(g) for _ in range(n)]
    images = [gen_world.render_textured(s) for s in scenes]
    judge = judge if judge is not None else load_judge()
    t0 = time.perf_counter()
    recs = judge_images(images, scenes, judge, seed, full=True)  # every check on every image: a breakdown
    wall = time.perf_counter() - t0
    out = {k: round(sum(r[k] for r in recs) / n, 4) for k in ("faithful", "count_ok", "colours_ok", "absent_ok")}
    return {"accuracy": out.pop("faithful"), **out, "n": n, "seed": seed, "s_per_image": round(wall / n, 3)}
