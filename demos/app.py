"""The Gradio demo: ask a VLM about an image, or generate an image, and watch speculative decoding work.

    mmspec demo [--vlm mini-vlm] [--gen mini-gen] [--host 127.0.0.1] [--port N] [--share]
    python -m mmspec.demos ...

The handlers (`Demo.ask`, `Demo.generate_image`) are plain generators over mmspec's stream API, so they are tested
without a browser; `build_app` wires them into Blocks. Each model serves one request at a time (its own queue), so the
engine state of a pipeline is never shared by two requests, and at most QUEUE_SIZE wait. An image rule whose `auto`
tree is not measured yet is measured on a background thread, never inside a request (the page says so). Uploads are
capped (MAX_FILE_SIZE) and read as images only (at most images.MAX_PIXELS); the app opens no path a user types.
Beyond this machine (a LAN --host, --share) anyone who reaches it can use it: `--auth USER:PASSWORD` or MMSPEC_DEMO_AUTH
asks for a login.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from mmspec.config import AutoTreeConfig
from mmspec.errors import InputError, UserError

from .render import BONUS, DRAFT, code_map_html, tokens_html, tree_svg

logger = logging.getLogger(__name__)

MAX_FILE_SIZE = "10mb"
QUEUE_SIZE = 16  # requests waiting at once; one more is told the queue is full instead of joining an endless backlog
PREVIEW_PX = 512  # the upload preview is a thumbnail: a large upload is decoded once, by the Ask handler, not sent back
SEED_MAX = 2**32 - 1  # the seed box's range: exact in a browser's numbers, and well inside torch's [0, 2**64)
AUTH_ENV = "MMSPEC_DEMO_AUTH"  # USER:PASSWORD, the same as --auth without showing it in the process list
RULES = ("exact", "lantern", "lantern++", "grouped")
DRAFTS = ("drafter", "jacobi")
SAMPLES = Path(__file__).resolve().parent.parent / "mmspec" / "assets"


def sample_images() -> list[str]:
    return sorted(str(p) for p in SAMPLES.glob("sample_scene*.png"))


@dataclass
class Demo:
    vlm: object | None  # a mmspec Pipeline, or None when not loaded
    gen: object | None  # a mmspec ImagePipeline, or None
    vlm_error: str = ""  # why a model is missing, shown in its tab
    gen_error: str = ""
    tuning: set = field(default_factory=set)  # repr of the rules whose auto tree a background thread is measuring
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)  # guards `tuning`
    _tune_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)  # one measurement at a time

    # ---- ask -----------------------------------------------------------------------------------------------------
    def ask(self, image: str | None, question: str, compare: bool = False, max_new_tokens: int = 128,
            temperature: float = 0.0) -> Iterator[tuple[str, str, str, str]]:
        """Streams (answer text, highlighted answer HTML, speed line, last step's tree SVG)."""
        from mmspec.images import load_images

        if self.vlm is None:
            raise _error(f"no VLM loaded: {self.vlm_error}")
        if not image:
            raise _error("upload an image (or click a sample scene) first")
        if not question or not question.strip():
            raise _error("type a question about the image")
        try:
            images = load_images([image])
        except UserError as e:
            raise _error(f"that upload is not a readable image: {e}") from None
        tok = self.vlm.tokenizer
        tokens: list[int] = []
        pieces: list[tuple[str, str]] = []
        text, stats, tree_html = "", None, ""
        kw = dict(max_new_tokens=int(max_new_tokens), temperature=float(temperature), seed=0)
        for ev in self._stream(lambda: self.vlm.stream(question, images, **kw)):
            n_draft = ev.num_accepted
            tokens.extend(ev.token_ids[:n_draft])
            drafted = tok.decode(tokens, skip_special_tokens=True)
            tokens.extend(ev.token_ids[n_draft:])
            full = tok.decode(tokens, skip_special_tokens=True)
            pieces += [(drafted[len(text):], DRAFT), (full[len(drafted):], BONUS)]
            text, stats = full, ev.stats
            if ev.tree is not None:
                labels = [tok.decode([t]) for t in ev.tree.tokens.tolist()]
                tree_html = tree_svg(ev.tree.parents.tolist(), labels, set(ev.path))
            yield text, tokens_html(pieces), _speed_line(stats), tree_html
        if compare:
            plain = self._call(lambda: self.vlm.generate(question, images, **kw, speculative=False))
            yield text, tokens_html(pieces), _speed_line(stats, plain.stats), tree_html

    # ---- generate ------------------------------------------------------------------------------------------------
    def generate_image(self, prompt: str, rule: str = "lantern", k: int = 8, delta: float = 0.2, lam: float = 2.0,
                       guidance: float = 5.0, seed: int = 0, compare: bool = False,
                       draft: str | None = None) -> Iterator[tuple]:
        """Streams (image so far, speed line, code-grid map HTML). draft: "drafter", "jacobi" or None (the drafter
        when the generator has one)."""
        if self.gen is None:
            raise _error(f"no image generator loaded: {self.gen_error}")
        if not prompt or not prompt.strip():
            raise _error("describe the image to generate")
        acceptance = self._rule(rule, int(k), float(delta), float(lam))
        if draft not in (None, *DRAFTS):
            raise _error(f"unknown drafting {draft!r}; choose one of {', '.join(DRAFTS)}")
        drafting = self._call(lambda: self.gen.drafting(draft))
        gen, note = self._gen_for(acceptance) if drafting == "drafter" else (self.gen, "")  # Jacobi: no tree
        grid = gen.adapter.grid(gen.target)
        steps, drafted, image, stats = [], [], None, None
        kw = dict(guidance_scale=float(guidance), seed=_seed(seed), draft=drafting)
        events = self._stream(lambda: gen.stream_image(prompt, acceptance=acceptance, **kw))
        for step, ev in enumerate(events):
            steps += [step] * len(ev.token_ids)
            drafted += [True] * ev.num_accepted + [False] * (len(ev.token_ids) - ev.num_accepted)
            image = _shown(ev.image) or image
            stats = ev.stats
            yield image, _speed_line(stats, unit="codes") + note, code_map_html(grid, steps, drafted)
        if compare:
            ar = self._call(lambda: gen.generate_image(prompt, **kw, speculative=False)).stats
            exact = self._call(lambda: gen.generate_image(prompt, **kw)).stats
            line = (_speed_line(stats, ar, unit="codes") + f" · exact rule {exact.tokens_per_s:.1f} codes/s "
                    f"({stats.tokens_per_s / exact.tokens_per_s:.2f}x of it)" + note)
            yield image, line, code_map_html(grid, steps, drafted)

    # ---- auto trees off the request path ---------------------------------------------------------------------------
    def _gen_for(self, acceptance) -> tuple[object, str]:
        """The pipeline this request draws with, and a note for the page. Measuring a rule's `auto` tree takes seconds
        to minutes and would hold the one generate queue: a rule not measured yet is measured on a background thread,
        and meanwhile its requests draft with the nearest shape measured so far."""
        gen = self.gen
        if not (isinstance(gen.tree, AutoTreeConfig) and gen.drafter is not None and gen.tuner is not None) \
                or repr(acceptance) in gen.tuned:
            return gen, ""
        with self._lock:
            start = repr(acceptance) not in self.tuning
            self.tuning.add(repr(acceptance))
        if start:
            threading.Thread(target=self._tune, args=(acceptance,), daemon=True, name="mmspec-demo-tune").start()
        tree = nearest_tree(gen.tuned, acceptance, gen.tree)
        note = (f" · drafting with the nearest measured tree (depth {tree.depth}, top_k {tree.top_k}, total "
                f"{tree.total_tokens}) while this rule's own is measured in the background")
        return gen.with_tree(tree), note

    def _tune(self, acceptance) -> None:
        try:
            with self._tune_lock:  # the tuner drives the pipeline's own runner: one measurement at a time
                self.gen.tune([acceptance])
        except Exception:  # a background thread has no page to show it on: log it, requests keep the nearest shape
            logger.exception("measuring the auto tree of %r failed", acceptance)
        finally:
            with self._lock:
                self.tuning.discard(repr(acceptance))

    @staticmethod
    def _rule(rule: str, k: int, delta: float, lam: float):
        from mmspec import Exact, Grouped, Lantern, LanternPP

        if rule not in RULES:
            raise _error(f"unknown acceptance rule {rule!r}; choose one of {', '.join(RULES)}")
        try:
            return {"exact": Exact, "lantern": lambda: Lantern(k=k, delta=delta),
                    "lantern++": lambda: LanternPP(k=k, lam=lam), "grouped": lambda: Grouped(k=k, delta=delta)}[rule]()
        except UserError as e:
            raise _error(str(e)) from None

    @staticmethod
    def _stream(make) -> Iterator:
        """Iterate `make()`, turning mmspec's input errors into an error shown in the page."""
        try:
            yield from make()
        except UserError as e:
            raise _error(str(e)) from None

    @staticmethod
    def _call(fn):
        try:
            return fn()
        except UserError as e:
            raise _error(str(e)) from None


def nearest_tree(tuned: dict, rule, fallback):
    """The measured tree of the tuned rule nearest to `rule`: the same kind of rule first, then the closest parameters
    (summed relative differences); `fallback` when nothing is measured. tuned: {repr(rule): (TreeConfig, record)}."""
    def kind_and_params(text: str) -> tuple[str, dict[str, float]]:
        return text.split("(")[0], {k: float(v) for k, v in re.findall(r"(\w+)=([-\d.e]+)", text)}

    want_kind, want = kind_and_params(repr(rule))

    def distance(text: str) -> tuple[int, float]:
        kind, params = kind_and_params(text)
        diff = sum(abs(params.get(k, 0.0) - v) / max(abs(v), 1e-9) for k, v in want.items())
        return (kind != want_kind, diff)

    return tuned[min(tuned, key=distance)][0] if tuned else fallback


def _seed(seed) -> int:
    """The seed box's value as a seed torch takes (gradio's Number may hand over a float such as 3.0)."""
    from mmspec.config import check_seed

    if isinstance(seed, float) and seed.is_integer():
        seed = int(seed)
    try:
        return check_seed(seed)
    except UserError as e:
        raise _error(str(e)) from None


def _shown(image):
    """A small generated image (mini-gen's are 32 px) scaled up by whole pixels to ~256 px, so codes stay visible."""
    if image is None:
        return None
    k = max(1, 256 // max(image.size))
    return image.resize((image.width * k, image.height * k), resample=0)  # 0 = nearest


def _preview(path: str | None):
    """A thumbnail of the uploaded file, or None when it is not a readable image within mmspec's pixel limit (the Ask
    handler then says why)."""
    from mmspec.images import load_image

    if not path:
        return None
    try:
        image = load_image(path).copy()  # a copy: thumbnail() works in place
    except UserError:
        return None
    image.thumbnail((PREVIEW_PX, PREVIEW_PX))
    return image


def _error(message: str) -> Exception:
    import gradio as gr

    return gr.Error(message)


def _speed_line(stats, plain=None, unit: str = "tokens") -> str:
    if stats is None:
        return ""
    line = (f"**{stats.tokens_per_s:.1f} {unit}/s** · tau {stats.mean_accepted:.2f} {unit} per target forward · "
            f"{stats.new_tokens} {unit} in {stats.target_forwards} forwards")
    if plain is not None:
        line += (f" · without speculation {plain.tokens_per_s:.1f} {unit}/s → "
                 f"**{stats.tokens_per_s / plain.tokens_per_s:.2f}x**")
    return line


def build_app(demo: Demo):
    """The Blocks app: an Ask tab and a Generate tab; API names /ask and /generate_image (gradio_client)."""
    import gradio as gr

    with gr.Blocks(title="mmspec demo") as app:
        gr.Markdown("# mmspec: multimodal speculative decoding\nA drafter proposes a tree of tokens; the unmodified "
                    "target verifies it in one forward. Green: tokens from accepted drafts.")
        with gr.Tab("Ask", id="ask"):
            with gr.Row():
                with gr.Column():
                    # a File input, not an Image one: gradio's Image would reject a non-image upload with a generic
                    # error before the handler runs; here the handler reads it and says what is wrong
                    image = gr.File(label="image (PNG, JPEG, ... up to 10 MB)", file_types=["image"],
                                    type="filepath", elem_id="image-upload")
                    preview = gr.Image(label="preview", interactive=False, height=200, elem_id="image-preview")
                    image.change(_preview, inputs=[image], outputs=[preview], api_visibility="private")
                    if sample_images():
                        gr.Examples(examples=sample_images(), inputs=[image], label="sample scenes")
                    question = gr.Textbox(label="question", value="Describe the image in detail.")
                    compare = gr.Checkbox(label="also decode without speculation (speed comparison)", value=False)
                    max_new = gr.Slider(8, 256, value=128, step=8, label="max new tokens")
                    temperature = gr.Slider(0.0, 1.5, value=0.0, step=0.1, label="temperature")
                    ask_btn = gr.Button("Ask", variant="primary", elem_id="ask-button")
                with gr.Column():
                    answer = gr.Textbox(label="answer", elem_id="answer-text", lines=4)
                    highlighted = gr.HTML(elem_id="answer-html")
                    speed = gr.Markdown(elem_id="ask-speed")
                    tree = gr.HTML(label="last step's draft tree (accepted path in green)", elem_id="ask-tree")
            if demo.vlm is None:
                gr.Markdown(f"**No VLM loaded:** {demo.vlm_error}")
            ask_btn.click(demo.ask, inputs=[image, question, compare, max_new, temperature],
                          outputs=[answer, highlighted, speed, tree], api_name="ask", concurrency_id="vlm",
                          concurrency_limit=1)
        with gr.Tab("Generate", id="generate"):
            with gr.Row():
                with gr.Column():
                    prompt = gr.Textbox(label="prompt", value="a big red circle at the top left")
                    rule = gr.Radio(list(RULES), value="lantern", label="acceptance rule")
                    draft = gr.Radio(list(DRAFTS), value="drafter" if demo.gen is None or demo.gen.drafter else
                                     "jacobi", label="drafting: a trained drafter, or training-free Jacobi windows",
                                     elem_id="drafting")
                    k = gr.Slider(1, 32, value=8, step=1, label="k: neighbours per drafted code")
                    delta = gr.Slider(0.0, 1.0, value=0.2, step=0.05,
                                      label="delta (TV bound per node: LANTERN, grouped)")
                    lam = gr.Slider(1.0, 5.0, value=2.0, step=0.25, label="lam (LANTERN++'s cap)")
                    guidance = gr.Slider(0.0, 10.0, value=5.0, step=0.5, label="guidance scale")
                    seed = gr.Number(value=0, precision=0, minimum=0, maximum=SEED_MAX, label="seed")
                    gen_compare = gr.Checkbox(label="also run autoregressive and exact (speed comparison)",
                                              value=False)
                    gen_btn = gr.Button("Generate", variant="primary", elem_id="generate-button")
                with gr.Column():
                    picture = gr.Image(label="image", type="pil", format="png", elem_id="generated-image", height=256)
                    gen_speed = gr.Markdown(elem_id="generate-speed")
                    code_map = gr.HTML(label="code grid: accepted drafts and steps", elem_id="code-map")
            if demo.gen is None:
                gr.Markdown(f"**No image generator loaded:** {demo.gen_error}")
            gen_btn.click(demo.generate_image, inputs=[prompt, rule, k, delta, lam, guidance, seed, gen_compare, draft],
                          outputs=[picture, gen_speed, code_map], api_name="generate_image", concurrency_id="gen",
                          concurrency_limit=1)
    return app


def load_demo(vlm: str | None, gen: str | None, device: str | None = None, vlm_drafter: str | None = None,
              gen_drafter: str | None = None) -> Demo:
    """Load both models; a missing or broken one leaves its tab with an error message instead of failing the app."""
    import mmspec

    models, errors = {}, {}
    for role, name, drafter in (("vlm", vlm, vlm_drafter), ("gen", gen, gen_drafter)):
        if not name:
            errors[role] = "disabled on the command line"
            continue
        try:
            # trees tuned to this machine (a few seconds once, then cached): the VLM's by load, the generator's per
            # acceptance rule, the tab's defaults now so that the first click does not wait for it
            models[role] = mmspec.load(name, drafter, device=device, tree=mmspec.TreeConfig.preset("auto"))
            if role == "gen" and hasattr(models[role], "tune"):
                models[role].tune([Demo._rule(r, 8, 0.2, 2.0) for r in ("exact", "lantern")])
        except UserError as e:
            errors[role] = str(e)
            logger.warning("%s %r not loaded: %s", role, name, e)
    if "vlm" in models and hasattr(models["vlm"], "generate_image"):
        raise UserError(f"--vlm {vlm!r} is an image generator; pass it as --gen")
    if "gen" in models and not hasattr(models["gen"], "generate_image"):
        raise UserError(f"--gen {gen!r} generates text; pass an AR image generator (Janus family)")
    return Demo(models.get("vlm"), models.get("gen"), errors.get("vlm", ""), errors.get("gen", ""))


def add_demo_args(p) -> None:
    p.add_argument("--vlm", default="mini-vlm", help="the Ask tab's target (default: the built-in mini-vlm)")
    p.add_argument("--gen", default="mini-gen", help="the Generate tab's target (default: the built-in mini-gen)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: this machine only)")
    p.add_argument("--port", type=int, default=None, help="port (default: gradio's, 7860 or the next free one)")
    p.add_argument("--share", action="store_true", help="also serve a public gradio.live link (off by default)")
    p.add_argument("--vlm-drafter", default=None, help="drafter for --vlm (default: the built-in target's own)")
    p.add_argument("--gen-drafter", default=None, help="drafter for --gen (default: the built-in target's own)")
    p.add_argument("--device", default=None)
    p.add_argument("--auth", default=None, metavar="USER:PASSWORD",
                   help=f"ask for this login (for a LAN --host or --share); or set {AUTH_ENV}, which, unlike a "
                        f"command line, other users of this machine cannot read")


def parse_auth(value: str | None) -> tuple[str, str] | None:
    if not value:
        return None
    user, sep, password = value.partition(":")
    if not (sep and user and password):
        raise InputError(f"--auth / {AUTH_ENV} takes USER:PASSWORD, both non-empty")
    return user, password


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def launch_options(args) -> dict:
    """What `serve` passes to gradio's launch: this machine only unless --host or --share say otherwise, and then
    a warning (anyone who reaches the address may run the models) unless a login is asked for."""
    auth = parse_auth(getattr(args, "auth", None) or os.environ.get(AUTH_ENV))
    exposed = [f"--host {args.host}"] * (not is_loopback(args.host)) + ["--share"] * bool(args.share)
    if exposed:
        logger.warning("the demo is reachable beyond this machine (%s)%s", ", ".join(exposed),
                       "" if auth else f": anyone who reaches it can run the models; set --auth or {AUTH_ENV}")
    return {"server_name": args.host, "server_port": args.port, "share": bool(args.share), "auth": auth,
            "max_file_size": MAX_FILE_SIZE}


def queue(app):
    """One request at a time per model (the events' concurrency_id), at most QUEUE_SIZE waiting."""
    return app.queue(default_concurrency_limit=1, max_size=QUEUE_SIZE)


def serve(args) -> int:
    options = launch_options(args)  # before loading the models: a bad --auth costs nothing
    app = build_app(load_demo(args.vlm, args.gen, args.device, args.vlm_drafter, args.gen_drafter))
    queue(app).launch(**options)
    return 0
