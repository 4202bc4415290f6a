"""`mmspec bench --target mini-gen`: autoregressive vs the trained drafter (exact, LANTERN, LANTERN++) vs training-free
Jacobi drafting (`sjd`: exact; `gsd`: the grouped rule; `sjd-lantern`) image generation, with sweeps.

Every setting generates the same held-out prompts with the same seeds (prompt k: seed + k), taking turns prompt by
prompt after one warm-up each, so a slow patch of a noisy machine hits all alike. Speed is codes per second of wall
time; tau counts every target forward, prefill included. Quality, from built-in models only (mmspec.quality):
faithfulness (the mini-vlm judge checks count and colours), CLIP score and FID (mini-clip features, against rendered
scenes of the same prompts). `lossless` runs exact and autoregressive once more at temperature 0 and compares codes.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .acceptance import Exact, Grouped, Lantern, LanternPP
from .bench import MethodResult, count_host_syncs, machine, take_turns
from .config import AutoTreeConfig, TreeConfig
from .errors import InputError, MissingInputError
from .jacobi import JacobiConfig

logger = logging.getLogger(__name__)

PROMPTS_FILE = Path(__file__).parent / "assets" / "gen_prompts.jsonl"
JACOBI = JacobiConfig()
GSD = Grouped(k=8, delta=0.3, closeness=0.15)  # the recommended setting (docs/image-generation.md)
# name -> (rule, drafting): None is autoregressive, "drafter" the trained drafter's tree, a JacobiConfig Jacobi windows
HEADLINE = {"autoregressive": (Exact(), None), "exact": (Exact(), "drafter"),
            "lantern": (Lantern(k=8, delta=0.2), "drafter"), "lantern++": (LanternPP(k=8, lam=2.0), "drafter"),
            "sjd": (Exact(), JACOBI), "gsd": (GSD, JACOBI), "sjd-lantern": (Lantern(k=8, delta=0.2), JACOBI)}
SWEEP = [(Lantern(k=k, delta=d), "drafter") for k in (4, 8, 16) for d in (0.05, 0.1, 0.2, 0.4)]
SWEEP += [(Exact(), JacobiConfig(window=w)) for w in (4, 8, 32)] + [(GSD, JacobiConfig(window=w)) for w in (8, 32)]
SWEEP += [(Grouped(k=8, delta=d), JACOBI) for d in (0.1, 0.5)] + [(Exact(), JacobiConfig(init="uniform")),
                                                                  (Exact(), JacobiConfig(coupled=False))]


QUALITY_KEYS = ("faithfulness", "clip_score", "fid")  # null in the JSON under --no-quality


@dataclass
class Setting(MethodResult):
    """One setting's results: the bench's one record (bench.MethodResult), plus the rule, what drafts, and the images
    for quality."""

    rule: object = None
    draft: str | JacobiConfig | None = None  # None: autoregressive
    images: list = field(default_factory=list)

    def add_image(self, res) -> None:
        self.images.append(res.image)
        self.add(res.token_ids, res.stats.wall_s, res.stats.target_forwards, res.stats)

    @property
    def kwargs(self) -> dict:
        return dict(acceptance=self.rule, speculative=self.draft is not None, draft=self.draft)

    @property
    def name(self) -> str:
        """A sweep row's label: the rule and, for Jacobi windows, the window."""
        d = self.draft
        if not isinstance(d, JacobiConfig):
            return repr(self.rule)
        return f"jacobi w={d.window} {d.init}{'' if d.coupled else ' uncoupled'} {self.rule!r}"


def held_out_gen_prompts(n: int) -> list[dict]:
    """The first n held-out records {"prompt", "scene"} shipped with mini-gen (never trained on)."""
    if not PROMPTS_FILE.is_file():
        raise MissingInputError(f"{PROMPTS_FILE} is missing; rebuild with `python -m mmspec.data_tools.build_minis "
                                f"--only gen`")
    records = [json.loads(line) for line in PROMPTS_FILE.read_text().splitlines() if line.strip()]
    if n > len(records):
        raise InputError(f"--n {n}: only {len(records)} held-out image prompts ship with mmspec")
    return records[:n]


def _settings(sweep: bool, has_drafter: bool) -> dict[str, Setting]:
    out = {name: Setting(rule=rule, draft=draft) for name, (rule, draft) in HEADLINE.items()}
    if sweep:
        out.update({s.name: s for s in (Setting(rule=rule, draft=draft) for rule, draft in SWEEP)})
    return {k: v for k, v in out.items() if has_drafter or v.draft != "drafter"}


def run_image_bench(target: str = "mini-gen", *, n: int = 16, guidance_scale: float = 5.0, temperature: float = 1.0,
                    device: str | None = None, dtype: str | None = None, tree_preset: str | None = None,
                    seed: int = 0, sweep: bool = True, quality: bool = True, draft_dtype: str | None = None) -> dict:
    from . import load

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    pipe = load(target, device=dev, dtype=dtype, tree=TreeConfig.preset(tree_preset or "auto"), draft_dtype=draft_dtype)
    records = held_out_gen_prompts(n)
    settings = _settings(sweep, pipe.drafter is not None)
    pipe.tune([s.rule for s in settings.values() if s.draft == "drafter"])  # one calibration for every rule (auto)
    kw = dict(guidance_scale=guidance_scale, temperature=temperature)

    def run(name: str, k: int):
        s = settings[name]
        return pipe.generate_image(records[k]["prompt"], **kw, seed=seed + k, **s.kwargs)

    with torch.inference_mode():
        take_turns(list(settings), len(records), lambda name, k: settings[name].add_image(run(name, k)),
                   lambda name: run(name, 0))
        for name in (n for n in HEADLINE if n in settings):  # one more, untimed run each: how often the host waits
            with count_host_syncs() as syncs:
                forwards = run(name, 0).stats.target_forwards
            settings[name].host_syncs_per_step = round(syncs["n"] / max(forwards, 1), 2)
        greedy = {m: [pipe.generate_image(r["prompt"], guidance_scale=guidance_scale, temperature=0.0,
                                          **settings[m].kwargs).token_ids for r in records]
                  for m in ("autoregressive", "exact", "sjd") if m in settings}
    scores = _quality(settings, records) if quality else {}
    lossless = {m: codes == greedy["autoregressive"] for m, codes in greedy.items()}
    report = _report(target, pipe, n, kw, settings, scores, lossless)
    if pipe.drafter is not None:
        report["draft_dtype"] = str(next(pipe.drafter.parameters()).dtype).removeprefix("torch.")
    print_image_table(report)
    return report


def _quality(settings: dict[str, Setting], records: list[dict]) -> dict[str, dict]:
    from . import quality
    from .data_tools.gen_world import render_textured
    from .data_tools.shapes_world import Scene

    scenes = [Scene.from_dict(r["scene"]) for r in records]
    prompts = [r["prompt"] for r in records]
    side = next(iter(settings.values())).images[0].width  # references at the target's own image size
    refs = [render_textured(s, side) for s in scenes]
    clip, judge = quality.load_clip(), quality.load_judge()
    out = {}
    for name, s in settings.items():
        logger.info("quality of %s", name)
        out[name] = {"faithfulness": quality.faithfulness(s.images, scenes, judge=judge),
                     "clip_score": quality.clip_score(s.images, prompts, clip=clip),
                     "fid": quality.fid(s.images, refs, clip=clip)}
    return out


def _report(target, pipe, n, kw, settings, scores, lossless) -> dict:
    ar = settings["autoregressive"].speed
    ex = settings["exact"].speed if "exact" in settings else None
    rows, sweep = {}, []
    for name, s in settings.items():
        quality = scores.get(name, dict.fromkeys(QUALITY_KEYS))  # no scores (--no-quality): the keys, null
        row = {"tokens_per_s": round(s.speed, 2), "mean_accepted": round(s.new_tokens / max(s.target_forwards, 1), 3),
               "speedup": round(s.speed / ar, 3), "speedup_over_exact": round(s.speed / ex, 3) if ex else None,
               **{k: (None if v is None else round(v, 4)) for k, v in quality.items()},
               "ms_per_step": {k: round(1e3 * v / max(s.target_forwards, 1), 3) for k, v in s.split_s.items()},
               "host_syncs_per_step": s.host_syncs_per_step,
               "tree": asdict(pipe.tree_for(s.rule)) if s.draft == "drafter" else None,
               "jacobi": asdict(s.draft) if isinstance(s.draft, JacobiConfig) else None}
        if name in HEADLINE:
            rows[name] = {**row, "rule": repr(s.rule), "lossless": lossless.get(name) if not s.rule.relaxed else None}
        else:
            sweep.append({"rule": type(s.rule).__name__.lower().replace("pp", "++"), "label": s.name,
                          **{k: v for k, v in asdict(s.rule).items()}, **row})
    return {"target": target, "device": str(pipe.device), "hardware": machine(pipe.device), "n_prompts": n,
            "guidance_scale": kw["guidance_scale"], "temperature": kw["temperature"],
            "tree_preset": _preset_name(pipe.tree), "methods": rows, "sweep": sweep}


def _preset_name(tree: TreeConfig) -> str:
    """"auto" (each rule's tree is in its row), or the fixed shape every rule drafted with."""
    if isinstance(tree, AutoTreeConfig):
        return "auto"
    return f"depth {tree.depth}, top_k {tree.top_k}, total_tokens {tree.total_tokens}"


def print_image_table(report: dict) -> None:
    lines = [f"mmspec bench: target={report['target']} device={report['device']} prompts={report['n_prompts']} "
             f"guidance={report['guidance_scale']} temperature={report['temperature']}",
             f"{'setting':<44}{'codes/s':>9}{'speedup':>9}{'vs exact':>9}{'tau':>7}{'faithful':>9}{'clip':>7}"
             f"{'fid':>8}  tree (depth/top_k/total) or window"]
    rows = list(report["methods"].items()) + [(r["label"], r) for r in report["sweep"]]
    for name, r in rows:
        q = [r.get(k) for k in ("faithfulness", "clip_score", "fid")]
        qs = "".join(f"{'-':>{w}}" if v is None else f"{v:>{w}.{p}f}" for v, w, p in zip(q, (9, 7, 8), (2, 1, 1)))
        t, j = r.get("tree"), r.get("jacobi")
        shape = f"  {t['depth']}/{t['top_k']}/{t['total_tokens']}" if t else (f"  window {j['window']}" if j else "")
        vs_exact = "-" if r["speedup_over_exact"] is None else f"{r['speedup_over_exact']:.2f}x"
        lines.append(f"{name[:43]:<44}{r['tokens_per_s']:>9.1f}{r['speedup']:>8.2f}x{vs_exact:>9}"
                     f"{r['mean_accepted']:>7.2f}{qs}{shape}")
    print("\n".join(lines))


def plot_tradeoff(report: dict, path: str | Path, size: tuple[int, int] = (720, 480)) -> Path:
    """Speedup over autoregressive (y) against faithfulness (x), one labelled point per setting, drawn with PIL
    (no plotting dependency). Needs a report with quality figures."""
    from PIL import Image, ImageDraw

    head = [(n, r["faithfulness"], r["speedup"]) for n, r in report["methods"].items()]
    sweep = [(r["label"], r["faithfulness"], r["speedup"]) for r in report["sweep"]]
    head, sweep = ([p for p in ps if p[1] is not None] for ps in (head, sweep))
    if not head:
        raise InputError("the report has no faithfulness figures (run the bench without --no-quality)")
    w, h, m = *size, 60
    xs, ys = [p[1] for p in head + sweep], [p[2] for p in head + sweep]
    x0, x1 = min(xs) - 0.03, max(xs + [1.0]) + 0.01
    y0, y1 = 0.0, max(ys) * 1.15
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)

    def at(x: float, y: float) -> tuple[float, float]:
        return m + (x - x0) / (x1 - x0) * (w - 2 * m), h - m - (y - y0) / (y1 - y0) * (h - 2 * m)

    draw.line([at(x0, y0), at(x1, y0)], fill="black")
    draw.line([at(x0, y0), at(x0, y1)], fill="black")
    for t in range(0, 11):
        ty = y0 + (y1 - y0) * t / 10
        draw.text((8, at(x0, ty)[1] - 6), f"{ty:.2f}x", fill="gray")
        tx = x0 + (x1 - x0) * t / 10
        draw.text((at(tx, y0)[0] - 12, h - m + 8), f"{tx:.2f}", fill="gray")
    draw.line([at(x0, 1.0), at(x1, 1.0)], fill=(200, 200, 200))  # autoregressive speed
    for label, x, y in sweep:  # unlabelled: the JSON names them; Jacobi sweeps green, drafter trees orange
        cx, cy = at(x, y)
        draw.ellipse([cx - 3, cy - 3, cx + 3, cy + 3], fill=(150, 210, 150) if "jacobi" in label else (240, 180, 130))
    colours = {"autoregressive": "black", "exact": "blue", "lantern": "red", "lantern++": "purple", "sjd": "green",
               "gsd": (0, 150, 150), "sjd-lantern": (120, 160, 0)}
    for name, x, y in head:
        cx, cy = at(x, y)
        colour = colours.get(name, (230, 120, 60))
        draw.ellipse([cx - 4, cy - 4, cx + 4, cy + 4], fill=colour)
        draw.text((cx + 6, cy - 6), name, fill=colour)
    draw.text((m, h - 20), "faithfulness; small points: the sweep (green: Jacobi windows and rules, orange: LANTERN "
                           "trees)", fill="gray")
    draw.text((m, 12), f"{report['target']}: speedup over autoregressive vs faithfulness ({report['n_prompts']} prompts, "
                       f"guidance {report['guidance_scale']}, T={report['temperature']})", fill="black")
    path = Path(path)
    img.save(path)
    return path
