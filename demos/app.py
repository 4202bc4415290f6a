"""The Gradio demo: ask a VLM about an image, or generate an image, and watch speculative decoding work.

    mmspec demo [--vlm mini-vlm] [--gen mini-gen] [--host 127.0.0.1] [--port N] [--share]
    python -m mmspec.demos ...

The handlers (`Demo.ask`, `Demo.generate_image`) are plain generators over mmspec's stream API, so they are tested
without a browser; `build_app` wires them into Blocks. Each model serves one request at a time (its own queue), so the
engine state of a pipeline is never shared by two requests. Uploads are capped (MAX_FILE_SIZE) and read as images
only; the app opens no path a user types.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from mmspec.errors import UserError

from .render import BONUS, DRAFT, code_map_html, tokens_html, tree_svg

logger = logging.getLogger(__name__)

MAX_FILE_SIZE = "10mb"
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
        grid = self.gen.adapter.grid(self.gen.target)
        steps, drafted, image, stats = [], [], None, None
        kw = dict(guidance_scale=float(guidance), seed=int(seed), draft=self._call(lambda: self.gen.drafting(draft)))
        events = self._stream(lambda: self.gen.stream_image(prompt, acceptance=acceptance, **kw))
        for step, ev in enumerate(events):
            steps += [step] * len(ev.token_ids)
            drafted += [True] * ev.num_accepted + [False] * (len(ev.token_ids) - ev.num_accepted)
            image = _shown(ev.image) or image
            stats = ev.stats
            yield image, _speed_line(stats, unit="codes"), code_map_html(grid, steps, drafted)
        if compare:
            ar = self._call(lambda: self.gen.generate_image(prompt, **kw, speculative=False)).stats
            exact = self._call(lambda: self.gen.generate_image(prompt, **kw)).stats
            line = (_speed_line(stats, ar, unit="codes") + f" · exact rule {exact.tokens_per_s:.1f} codes/s "
                    f"({stats.tokens_per_s / exact.tokens_per_s:.2f}x of it)")
            yield image, line, code_map_html(grid, steps, drafted)

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


def _shown(image):
    """A small generated image (mini-gen's are 32 px) scaled up by whole pixels to ~256 px, so codes stay visible."""
    if image is None:
        return None
    k = max(1, 256 // max(image.size))
    return image.resize((image.width * k, image.height * k), resample=0)  # 0 = nearest


def _preview(path: str | None):
    """The uploaded file as a picture, or None when it is not one (the Ask handler then says why)."""
    from PIL import Image, UnidentifiedImageError

    if not path:
        return None
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError):
        return None


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
                    seed = gr.Number(value=0, precision=0, label="seed")
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


def serve(args) -> int:
    app = build_app(load_demo(args.vlm, args.gen, args.device, args.vlm_drafter, args.gen_drafter))
    app.queue(default_concurrency_limit=1)
    app.launch(server_name=args.host, server_port=args.port, share=args.share, max_file_size=MAX_FILE_SIZE)
    return 0
