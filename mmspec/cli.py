"""`mmspec` command line. Every subcommand is a thin layer over the library; a bad argument or unreadable input (argparse,
or a mmspec.errors.UserError from the library) exits with status 2 and one line on stderr, never a traceback. Any other
exception is a bug and keeps its traceback."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .errors import InputError, UserError

# Only bad input becomes the one-line, exit-2 error; anything else is a bug and keeps its traceback.
USER_ERRORS = (UserError,)
COMPARE_ROUNDS = 3  # --compare: timed runs of each method, taking turns; the best of each is reported


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, status 2 (argparse's default prints the whole usage)
        self.exit(2, f"{self.prog}: error: {message}\n")


def _positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}")
    return v


def _nonneg_float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {s!r}") from None
    if not v >= 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {s!r}")
    return v


def _seed(s: str) -> int:
    """A seed torch can take: an integer in [0, 2**64) (past it torch overflows with a traceback)."""
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer seed, got {s!r}") from None
    if not 0 <= v < 2**64:
        raise argparse.ArgumentTypeError(f"expected a seed in [0, 2**64), got {s!r}")
    return v


DTYPES = ("float32", "bfloat16", "float16")  # what mmspec.load accepts (pipeline._as_dtype); mmspec stays lazy here


def _add_model_args(p: argparse.ArgumentParser, drafter: bool = True) -> None:
    p.add_argument("--target", default="mini-vlm", help="built-in name, local directory, or cached Hugging Face id")
    if drafter:
        p.add_argument("--drafter", default=None, help="drafter directory or built-in name (default: the target's own)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--dtype", default=None, choices=DTYPES)
    p.add_argument("--draft-dtype", default=None, choices=DTYPES,
                   help="the drafters' dtype (default: the target's; beside an fp32 target on a CPU with native "
                   "bf16, the faster of fp32 and bfloat16 there)")
    p.add_argument("--tree", default=None, help="tree preset: auto, chain, cpu, default, gpu (default: auto, measured for "
                   "the target, drafter and machine once and cached; for image generators per acceptance rule)")


def _add_sampling_args(p: argparse.ArgumentParser, temperature: float) -> None:
    p.add_argument("--temperature", type=_nonneg_float, default=temperature)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=_seed, default=None)


def _add_generate_image_parser(sub) -> None:
    """`mmspec generate-image`: the image-generation contract's flags."""
    gen = sub.add_parser("generate-image", help="generate an image with an AR image generator (Janus family)")
    gen.add_argument("prompt")
    gen.add_argument("--out", type=Path, required=True, help="image file to write (.png, .jpg, ...)")
    _add_model_args(gen)
    gen.set_defaults(target="mini-gen")
    gen.add_argument("--acceptance", choices=sorted(RULES), default="exact")
    gen.add_argument("--lantern-k", type=_positive_int, default=None, help="neighbours per drafted code (default 8)")
    gen.add_argument("--lantern-delta", type=float, default=None, help="LANTERN's total-variation bound (default 0.2)")
    gen.add_argument("--lantern-lam", type=float, default=None, help="LANTERN++'s cap p~(x) <= lam p(x) (default 2)")
    gen.add_argument("--group-delta", type=float, default=None,
                     help="the grouped rule's total-variation bound per node (default 0.3)")
    gen.add_argument("--draft", choices=("drafter", "jacobi"), default=None,
                     help="what drafts codes: the trained drafter's tree, or training-free Jacobi windows "
                          "(default: the drafter when the target has one, else jacobi)")
    gen.add_argument("--window", type=_positive_int, default=None, help="codes per Jacobi window (default 16)")
    gen.add_argument("--guidance-scale", type=float, default=5.0)  # checked by the library: finite, >= 0
    _add_sampling_args(gen, temperature=1.0)
    gen.add_argument("--compare", action="store_true", help="also generate without drafting and print both speeds")
    gen.add_argument("--force", action="store_true", help="overwrite --out if it exists")


def build_parser() -> Parser:
    parser = Parser(prog="mmspec", description="Multimodal speculative decoding (EAGLE-style trees, ViSpec drafters).")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress at INFO level")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    cap = sub.add_parser("caption", help="caption or answer about images, optionally comparing with plain decoding")
    cap.add_argument("images", nargs="*", help="image files (default: a bundled sample scene for built-in targets)")
    cap.add_argument("--prompt", default="Describe the image in detail.")
    _add_model_args(cap)
    cap.add_argument("--max-new-tokens", type=_positive_int, default=128)
    _add_sampling_args(cap, temperature=0.0)
    cap.add_argument("--compare", action="store_true", help="also decode without drafting; print speeds and a match check")

    bench = sub.add_parser("bench", help="compare autoregressive, hf_assisted, eagle and vispec decoding")
    _add_model_args(bench, drafter=False)
    bench.add_argument("--n", type=_positive_int, default=8, help="number of held-out prompts")
    bench.add_argument("--max-new-tokens", type=_positive_int, default=None,
                       help="VLM targets (default 128); an image generator writes its fixed number of codes")
    bench.add_argument("--temperature", type=_nonneg_float, default=None, help="default 0 (VLMs), 1 (image generators)")
    bench.add_argument("--guidance-scale", type=_nonneg_float, default=5.0, help="image generators: the CFG scale")
    bench.add_argument("--no-sweep", dest="sweep", action="store_false",
                       help="image generators: skip the sweeps (LANTERN settings, Jacobi windows and rules)")
    bench.add_argument("--no-quality", dest="quality", action="store_false",
                       help="image generators: skip faithfulness / CLIP / FID (speed only)")
    bench.add_argument("--methods", default=None, help="comma-separated subset of methods to run")
    bench.add_argument("--seed", type=_seed, default=0, help="sampling seed of the first prompt (prompt k: seed + k)")
    bench.add_argument("--json", type=Path, default=None, help="write the results here")
    bench.add_argument("--plot", type=Path, default=None, help="image generators: speedup vs faithfulness PNG")

    tr = sub.add_parser("train-drafter", help="train a drafter for a target on JSONL conversations")
    tr.add_argument("--target", required=True)
    tr.add_argument("--data", type=Path, required=True)
    tr.add_argument("--out", type=Path, required=True)
    tr.add_argument("--vision-adaptor", action=argparse.BooleanOptionalAction, default=True)
    tr.add_argument("--fusion", choices=["multi_layer", "last"], default="multi_layer")
    tr.add_argument("--num-queries", type=_positive_int, default=2)
    tr.add_argument("--intermediate-size", type=_positive_int, default=None,
                    help="the drafter's MLP width (default: the target's); narrower drafts faster on a CPU")
    tr.add_argument("--num-heads", type=_positive_int, default=None,
                    help="the drafter's attention heads (default: the target's)")
    tr.add_argument("--draft-vocab", type=_positive_int, default=None, metavar="N",
                    help="predict only the N most frequent target tokens of the data (EAGLE-3; default: all)")
    tr.add_argument("--epochs", type=_positive_int, default=1)
    tr.add_argument("--max-steps", type=_positive_int, default=None)
    tr.add_argument("--batch-size", type=_positive_int, default=8)
    tr.add_argument("--grad-accum", type=_positive_int, default=1)
    tr.add_argument("--lr", type=float, default=3e-4)
    tr.add_argument("--seed", type=_seed, default=0)
    tr.add_argument("--ttt-steps", type=_positive_int, default=3, help="training-time-test unroll depth (EAGLE-3)")
    tr.add_argument("--eval-fraction", type=float, default=0.05)
    tr.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"], default="no")
    tr.add_argument("--save-every", type=_positive_int, default=200)
    tr.add_argument("--max-length", type=_positive_int, default=1024)
    tr.add_argument("--teacher-cache-gb", type=_nonneg_float, default=2.0,
                    help="host memory for the target's signals, reused across epochs (0: recompute every time)")
    tr.add_argument("--device", default=None, help="cpu or cuda (default: what accelerate picks)")
    tr.add_argument("--guidance-scale", type=_nonneg_float, default=5.0,
                    help="image targets: the CFG scale the target draws its own training images with")
    tr.add_argument("--draft-rows", type=int, choices=[1, 2], default=1,
                    help="image targets: 1 drafts from the cond row (trained on the guided distribution), 2 from "
                         "both CFG rows' combined logits (LANTERN)")

    _add_generate_image_parser(sub)

    demo = sub.add_parser("demo", help="serve the Gradio demo (ask a VLM, generate images) on localhost")
    from .demos.app import add_demo_args

    add_demo_args(demo)

    _add_drafter_file_parsers(sub)
    return parser


def _add_drafter_file_parsers(sub) -> None:
    """`mmspec export-drafter` (to the engines' layout) and `mmspec convert-drafter` (from a published one)."""
    ex = sub.add_parser("export-drafter", help="write a drafter in another engine's checkpoint layout")
    ex.add_argument("drafter", type=Path)
    ex.add_argument("--format", required=True, choices=["eagle3"])
    ex.add_argument("--out", type=Path, required=True)
    ex.add_argument("--drop-vision-adaptor", action="store_true")
    ex.add_argument("--target", default=None, help="the drafter's target (default: the one recorded at training)")
    cv = sub.add_parser("convert-drafter", help="convert a published EAGLE-1/2 or EAGLE-3 drafter to mmspec's layout")
    cv.add_argument("src", help="checkpoint directory or cached Hugging Face id")
    cv.add_argument("--out", type=Path, required=True)
    cv.add_argument("--target", default=None, help="the target it drafts for (needed when the checkpoint does not "
                    "name the target layers it reads: EAGLE-1/2, EAGLE-3 without aux layer ids)")
    cv.add_argument("--trust-pickle", action="store_true", help="read pytorch_model.bin and other pickles (only for a "
                    "source you trust: unpickling can run code)")


def _tree(args) -> "object":
    """The --tree preset; by default `auto`: tuned by mmspec.load for text and VLM targets, per acceptance rule on
    first use for image generators (mmspec.image_autotune)."""
    from .config import TreeConfig

    return TreeConfig.preset(args.tree or "auto")


def _print_tree(pipe) -> None:
    t = pipe.tree
    print(f"[tree] depth {t.depth}, top_k {t.top_k}, total_tokens {t.total_tokens}", file=sys.stderr)


def cmd_caption(args) -> int:
    import torch

    from . import load
    from .images import load_images
    from .registry import BUILTIN_TARGETS, sample_image_path

    images = [str(p) for p in args.images]
    if not images:
        if args.target not in BUILTIN_TARGETS:
            raise InputError("give one or more IMAGE files (the bundled sample scene is for built-in targets only)")
        images = [str(sample_image_path())]
    images = load_images(images)  # read and check every image before spending time on loading models
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe = load(args.target, args.drafter, device=device, dtype=args.dtype, tree=_tree(args),
                draft_dtype=args.draft_dtype)
    _print_tree(pipe)
    kw = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
              seed=args.seed)
    runs = _compare(lambda speculative, short=False: pipe.generate(
        args.prompt, images, **{**kw, "max_new_tokens": 4 if short else kw["max_new_tokens"]}, speculative=speculative),
        args.compare)
    res = runs[True][0]
    print(res.text)
    s = max((r.stats for r in runs[True]), key=lambda st: st.tokens_per_s)
    print(f"[speculative] {s.new_tokens} tokens, {s.tokens_per_s:.1f} tok/s, tau {s.mean_accepted:.2f}", file=sys.stderr)
    if args.compare:
        ar = max(runs[False], key=lambda r: r.stats.tokens_per_s)
        same = all(r.token_ids == ar.token_ids for r in runs[True] + runs[False])
        speedup = s.tokens_per_s / ar.stats.tokens_per_s if ar.stats.tokens_per_s else float("nan")
        print(
            f"speculative {s.tokens_per_s:8.1f} tok/s   autoregressive {ar.stats.tokens_per_s:8.1f} tok/s   "
            f"speedup {speedup:.2f}x   tau {s.mean_accepted:.2f}   outputs match: "
            + ("yes" if same else ("no (sampling: runs differ by design)" if args.temperature > 0 else "NO")),
        )
    return 0


def _compare(run, compare: bool) -> dict:
    """{speculative: [result of each round]} of `run(speculative, short=False)`: with --compare a short warm-up of
    each method, then COMPARE_ROUNDS rounds taking turns (bench.take_turns), so a machine that speeds up or slows down
    during the runs (caches, clocks, neighbours) treats both alike; without it, one speculative run."""
    from .bench import take_turns

    modes = (True, False) if compare else (True,)
    runs = {m: [] for m in modes}
    take_turns(list(modes), COMPARE_ROUNDS if compare else 1, lambda m, _: runs[m].append(run(m)),
               lambda m: run(m, short=True) if compare else None)
    return runs


RULES = {"exact": (), "lantern": ("lantern_k", "lantern_delta"), "lantern++": ("lantern_k", "lantern_lam"),
         "grouped": ("lantern_k", "group_delta")}


def acceptance_rule(args):
    """--acceptance and its --lantern-* flags -> the rule; a flag the chosen rule does not read is an error."""
    from . import Exact, Grouped, Lantern, LanternPP

    given = {f for f in ("lantern_k", "lantern_delta", "lantern_lam", "group_delta") if getattr(args, f) is not None}
    stray = given - set(RULES[args.acceptance])
    if stray:
        flags = ", ".join("--" + f.replace("_", "-") for f in sorted(stray))
        raise InputError(f"--acceptance {args.acceptance} does not read {flags}; drop it or pick the rule it belongs to")
    k = args.lantern_k or 8
    if args.acceptance == "lantern":
        return Lantern(k=k, delta=0.2 if args.lantern_delta is None else args.lantern_delta)
    if args.acceptance == "lantern++":
        return LanternPP(k=k, lam=2.0 if args.lantern_lam is None else args.lantern_lam)
    if args.acceptance == "grouped":
        return Grouped(k=k, delta=0.3 if args.group_delta is None else args.group_delta)
    return Exact()


def drafting(args):
    """--draft and --window -> generate_image's `draft` (None: the pipeline's default)."""
    from . import JacobiConfig

    if args.window is not None and args.draft == "drafter":
        raise InputError("--window sizes Jacobi windows; it does not apply with --draft drafter")
    if args.window is not None:
        return JacobiConfig(window=args.window)
    return args.draft


def cmd_generate_image(args) -> int:
    import torch

    from . import load
    from .adapters import generates_images
    from .registry import target_config

    rule = acceptance_rule(args)
    out = Path(args.out)
    if out.exists() and not args.force:
        raise InputError(f"{str(out)!r} exists; pass --force to overwrite it or choose another --out")
    if out.suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp", ".bmp"):
        raise InputError(f"--out {str(out)!r} needs an image extension: .png, .jpg, .webp or .bmp")
    if not generates_images(target_config(args.target)[1]):
        raise InputError(f"target {args.target!r} generates text, not images; generate-image takes an AR image "
                         f"generator (Janus family), e.g. --target mini-gen")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe = load(args.target, args.drafter, device=device, dtype=args.dtype, tree=_tree(args),
                draft_dtype=args.draft_dtype)
    draft = pipe.drafting(drafting(args))
    kw = dict(guidance_scale=args.guidance_scale, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
              seed=args.seed, acceptance=rule, draft=draft)
    runs = _compare(lambda speculative, short=False: pipe.generate_image(args.prompt, **kw, speculative=speculative),
                    args.compare)
    res = runs[True][0]
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        res.image.save(out)
    except (OSError, ValueError) as e:
        raise InputError(f"cannot write --out {str(out)!r}: {e}") from None
    s = max((r.stats for r in runs[True]), key=lambda st: st.tokens_per_s)
    if draft == "drafter":
        t = pipe.tree_for(rule)
        how = f"[tree] depth {t.depth}, top_k {t.top_k}, total_tokens {t.total_tokens}"
    else:
        how = f"[jacobi] window {draft.window}, init {draft.init}, coupled {draft.coupled}"
    print(f"wrote {out} ({res.image.width}x{res.image.height}, {len(res.token_ids)} codes); rule {rule}; {how}")
    print(f"speculative {s.tokens_per_s:8.1f} codes/s   tau {s.mean_accepted:.2f}")
    if args.compare:
        ar = max(r.stats.tokens_per_s for r in runs[False])
        print(f"autoregressive {ar:8.1f} codes/s   speedup {s.tokens_per_s / ar:.2f}x (rule {rule})")
    return 0


def cmd_bench(args) -> int:
    from .bench import run_bench

    methods = args.methods.split(",") if args.methods else None
    if args.json:
        _write_json(args.json, None)  # a --json that cannot be written fails now, not after the whole bench
    image = _is_image_target(args.target)
    _check_bench_flags(args, methods, image)
    if image:
        from .bench_image import run_image_bench

        report = run_image_bench(args.target, n=args.n, guidance_scale=args.guidance_scale,
                                 temperature=1.0 if args.temperature is None else args.temperature, device=args.device,
                                 dtype=args.dtype, tree_preset=args.tree, seed=args.seed, sweep=args.sweep,
                                 quality=args.quality, draft_dtype=args.draft_dtype)
        if args.plot:
            from .bench_image import plot_tradeoff

            print(f"wrote {plot_tradeoff(report, args.plot)}")
    else:
        report = run_bench(args.target, n=args.n, max_new_tokens=args.max_new_tokens or 128,
                           temperature=args.temperature or 0.0, device=args.device, dtype=args.dtype,
                           tree_preset=args.tree, methods=methods, draft_dtype=args.draft_dtype, seed=args.seed)
    if args.json:
        _write_json(args.json, report)
    return 0


def _is_image_target(target: str) -> bool:
    """Whether `mmspec bench` runs the image bench: the target's config says it is an AR image generator (mini-gen,
    or any Janus checkpoint directory), not its name."""
    from .adapters import generates_images
    from .registry import target_config

    return generates_images(target_config(target)[1])


def _check_bench_flags(args, methods, image: bool) -> None:
    """Each bench reads only its own flags: one the chosen bench would ignore is refused before anything runs."""
    if image:
        stray = [f for f, given in (("--methods", methods), ("--max-new-tokens", args.max_new_tokens)) if given]
        if stray:
            raise InputError(f"{', '.join(stray)} applies to VLM targets; an image bench runs every rule for the "
                             f"target's fixed number of codes (--no-sweep cuts the sweep)")
        if args.plot and not args.quality:
            raise InputError("--plot draws speedup against faithfulness, which --no-quality skips; drop one")
        return
    stray = [f for f, given in (("--plot", args.plot), ("--no-sweep", not args.sweep), ("--no-quality", not args.quality))
             if given]
    if stray:
        raise InputError(f"{', '.join(stray)} applies to image generators (e.g. --target mini-gen), not to "
                         f"{args.target!r}")


def _write_json(path: Path, obj) -> None:
    """Write obj as JSON (None: only check that path can be written, leaving no file behind)."""
    existed = path.exists()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a" if obj is None else "w", encoding="utf-8") as f:
            if obj is not None:
                f.write(json.dumps(obj, indent=2) + "\n")
    except OSError as e:
        raise InputError(f"cannot write --json {str(path)!r}: {e.strerror or e}") from None
    if obj is None and not existed:
        path.unlink()


def cmd_train(args) -> int:
    from .train import train_from_args

    train_from_args(args)
    return 0


def cmd_demo(args) -> int:
    from .demos.app import serve

    return serve(args)


def cmd_export(args) -> int:
    from .export import export_eagle3

    export_eagle3(args.drafter, args.out, drop_vision_adaptor=args.drop_vision_adaptor, target=args.target)
    print(f"wrote {args.out}")
    return 0


def cmd_convert(args) -> int:
    from .external_drafters import convert

    convert(args.src, args.out, target=args.target, trust_pickle=args.trust_pickle)
    print(f"wrote {args.out}")
    return 0


COMMANDS = {"caption": cmd_caption, "bench": cmd_bench, "train-drafter": cmd_train, "export-drafter": cmd_export,
            "convert-drafter": cmd_convert,
            "generate-image": cmd_generate_image, "demo": cmd_demo}


def run_guarded(prog: str, verbose: bool, body) -> int:
    """Logging setup and the error contract every entry point shares: a user error is one line on stderr, status 2."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not verbose:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    try:
        return body()
    except USER_ERRORS as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"{prog}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_guarded(f"mmspec {args.command}", args.verbose, lambda: COMMANDS[args.command](args))


if __name__ == "__main__":
    raise SystemExit(main())
