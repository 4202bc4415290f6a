"""Image generation on tiny random-weight Janus checkpoints (layer 2): the exact rule's greedy codes equal the target's
own `generate(generation_mode="image")`, through the plain loop, an untrained drafter and an oracle that gets long
paths accepted; Lantern(delta=0) equals Exact under one seed; streaming, drafters and errors."""

from __future__ import annotations

import pytest
import torch

import mmspec
from mmspec import DraftTree, Exact, Lantern, UserError
from mmspec.engine import decode, guidance
from mmspec.verify import accept_greedy

PROMPTS = ["a big red circle", "two small blue squares at the top left"]


@pytest.fixture(scope="module")
def pipe(tiny_dir):
    return mmspec.load(tiny_dir("janus"), drafter="untrained", device="cpu")


def reference(pipe, prompt: str, scale: float) -> list[int]:
    model = pipe.target
    model.generation_config.generation_kwargs = {"boi_token_id": pipe.boi_token_id}  # from_pretrained drops it
    return model.generate(**pipe.prepare(prompt), generation_mode="image", do_sample=False, guidance_scale=scale)[0].tolist()


class Oracle:
    """Proposes the next reference codes as a chain, with a wrong first sibling at depth 1: long accepted paths through
    the sibling recursion, the rows' cache edits and positions."""

    needs_features = False
    forwards = 0

    def __init__(self, codes: list[int], prompt_len: int, vocab: int) -> None:
        self.codes, self.prompt_len, self.vocab = codes, prompt_len, vocab

    def start(self, prompt, first_token, first_pos):
        pass

    def propose(self, root, root_pos):
        i = root_pos - self.prompt_len + 1  # index of the code after the root
        chain = self.codes[i : i + 4]
        if not chain:
            return DraftTree.from_parents(root.reshape(1), [-1])
        wrong = (chain[0] + 1) % self.vocab
        tokens = [int(root), wrong] + chain
        parents = [-1, 0, 0] + list(range(2, 2 + len(chain) - 1))
        return DraftTree.from_parents(torch.tensor(tokens), parents)

    def commit(self, tree, acceptance, hidden_states, scores=None):
        pass


@pytest.mark.parametrize("prompt, scale", [(PROMPTS[0], 5.0), (PROMPTS[1], 5.0), (PROMPTS[1], 2.0)])
def test_exact_greedy_equals_janus_generate(pipe, prompt, scale):
    ref = reference(pipe, prompt, scale)
    assert len(ref) == 16
    for speculative in (False, True):
        res = pipe.generate_image(prompt, guidance_scale=scale, temperature=0.0, speculative=speculative)
        assert res.token_ids == ref
        assert res.image.size == (16, 16)
    inputs = pipe.prepare(prompt)
    rows = pipe.adapter.guidance_rows(inputs, *pipe.special)
    oracle = Oracle(ref, inputs["input_ids"].shape[1], pipe.codebook_size)
    codes, accepted = [], 0
    for ev in decode(pipe.runner, oracle, rows, accept_greedy, 16, frozenset(), None, guidance(scale)):
        codes.extend(ev.token_ids)
        accepted += ev.num_accepted
    assert codes == ref
    assert accepted >= 10  # most codes came from accepted drafts: the tree path was really exercised


@pytest.mark.parametrize("window", [1, 4, 16])
def test_jacobi_greedy_equals_janus_generate_without_a_drafter(tiny_dir, window):
    """A Janus checkpoint that ships no drafter drafts Jacobi windows by default; at temperature 0 its codes are the
    target's own greedy CFG generate, whatever the window (16 here is the whole image)."""
    gen = mmspec.load(tiny_dir("janus"), device="cpu")
    assert gen.drafter is None and gen.drafting() == gen.jacobi
    ref = reference(gen, PROMPTS[0], 5.0)
    res = gen.generate_image(PROMPTS[0], temperature=0.0, draft=mmspec.JacobiConfig(window=window))
    assert res.token_ids == ref and res.stats.draft_forwards == 0
    sampled = gen.generate_image(PROMPTS[1], seed=3)  # temperature 1, exact: runs, seeded
    assert sampled.token_ids == gen.generate_image(PROMPTS[1], seed=3).token_ids
    with pytest.raises(UserError, match="needs a drafter"):
        gen.generate_image(PROMPTS[0], draft="drafter")
    with pytest.raises(UserError, match="draft must be"):
        gen.generate_image(PROMPTS[0], draft="medusa")


def test_guidance_one_is_the_cond_row_alone(pipe):
    """Scale 1 runs one row; the codes equal a plain greedy loop over the cond row's generation head."""
    model, inputs = pipe.target, pipe.prepare(PROMPTS[0])
    embeds = model.get_input_embeddings()(inputs["input_ids"])
    lm, codes = model.model.language_model, []
    with torch.no_grad():
        for _ in range(16):
            hidden = lm(inputs_embeds=embeds).last_hidden_state[:, -1]
            codes.append(int(model.model.generation_head(hidden).argmax(-1)))
            embeds = torch.cat([embeds, model.prepare_embeddings_for_image_generation(torch.tensor([[codes[-1]]]))], 1)
    assert pipe.generate_image(PROMPTS[0], guidance_scale=1.0, temperature=0.0).token_ids == codes


def test_lantern_delta_zero_is_exact_under_one_seed(pipe):
    for seed in (0, 1):
        exact = pipe.generate_image(PROMPTS[1], temperature=1.0, seed=seed, acceptance=Exact())
        lantern = pipe.generate_image(PROMPTS[1], temperature=1.0, seed=seed, acceptance=Lantern(k=4, delta=0.0))
        assert lantern.token_ids == exact.token_ids
    greedy = pipe.generate_image(PROMPTS[1], temperature=0.0, acceptance=Lantern(k=4, delta=0.0))
    assert greedy.token_ids == reference(pipe, PROMPTS[1], 5.0)


def test_seeded_sampling_is_deterministic_and_seeds_differ(pipe):
    a = pipe.generate_image(PROMPTS[0], seed=3, acceptance=Lantern(k=4, delta=0.2)).token_ids
    b = pipe.generate_image(PROMPTS[0], seed=3, acceptance=Lantern(k=4, delta=0.2)).token_ids
    c = pipe.generate_image(PROMPTS[0], seed=4, acceptance=Lantern(k=4, delta=0.2)).token_ids
    assert a == b and a != c


def test_stream_grows_row_by_row_and_ends_with_the_image(pipe):
    events = list(pipe.stream_image(PROMPTS[0], seed=5))
    codes = [c for ev in events for c in ev.token_ids]
    final = pipe.generate_image(PROMPTS[0], seed=5)
    assert codes == final.token_ids
    shown = [ev.image for ev in events if ev.image is not None]
    assert len(shown) == 4  # one picture per completed row of the 4 x 4 grid
    assert shown[-1].tobytes() == final.image.tobytes()
    assert shown[0].getpixel((8, 15)) == (128, 128, 128)  # rows not generated yet are gray


def test_neighbours_table(pipe):
    table = pipe.neighbours
    assert table.shape == (64, 63) and table.dtype == torch.long
    assert not (table == torch.arange(64)[:, None]).any()


def test_two_row_drafter_is_lossless(pipe):
    """A drafter on both CFG rows (draft_rows=2) drafts from the rows' combined logits; output stays exact."""
    drafter = mmspec.Drafter.for_target(pipe.target, draft_rows=2)
    both = mmspec.load(pipe.target.name_or_path, drafter=drafter, device="cpu")
    for prompt in PROMPTS:
        res = both.generate_image(prompt, temperature=0.0)
        assert res.token_ids == reference(pipe, prompt, 5.0) and res.stats.draft_forwards > 0
    with pytest.raises(UserError, match="draft_rows"):
        mmspec.Drafter.for_target(mmspec.load(pipe.target.name_or_path, drafter="untrained", device="cpu").target,
                                  draft_rows=3)


def test_image_drafter_round_trip(pipe, tmp_path):
    assert pipe.drafter.config.modality == "image" and pipe.drafter.config.vocab_size == 64
    pipe.drafter.save_pretrained(tmp_path / "d")
    again = mmspec.load(pipe.target.name_or_path, drafter=tmp_path / "d", device="cpu")
    assert again.generate_image(PROMPTS[0], temperature=0.0).token_ids == reference(pipe, PROMPTS[0], 5.0)


@pytest.mark.parametrize("kwargs, match", [
    (dict(guidance_scale=-1.0), "guidance_scale"),
    (dict(acceptance=Lantern(k=64, delta=0.1)), "between 1 and 63"),
    (dict(acceptance="lantern"), "acceptance rule"),
    (dict(temperature=-1.0), "temperature"),
])
def test_bad_arguments_are_named(pipe, kwargs, match):
    with pytest.raises(UserError, match=match):
        pipe.generate_image(PROMPTS[0], **kwargs)


def test_text_drafter_and_text_target_mismatches(pipe, tiny_dir):
    text_drafter = mmspec.Drafter.for_target(mmspec.load(tiny_dir("llava"), drafter="untrained", device="cpu").target)
    with pytest.raises(UserError, match="drafter does not match"):
        mmspec.load(tiny_dir("janus"), drafter=text_drafter, device="cpu")
    vlm = mmspec.load(tiny_dir("llava"), drafter="untrained", device="cpu")
    with pytest.raises(UserError, match="text target takes only"):
        vlm.generate("hi", acceptance=Lantern(k=2, delta=0.1))


def test_generate_image_cli(tiny_dir, tmp_path, capsys):
    from mmspec.cli import main

    out = tmp_path / "x.png"
    args = ["generate-image", "a big red circle", "--target", str(tiny_dir("janus")), "--drafter", "untrained",
            "--out", str(out), "--acceptance", "lantern", "--lantern-k", "4", "--seed", "1", "--compare"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "Lantern(k=4, delta=0.2)" in printed and "autoregressive" in printed and "speedup" in printed
    from PIL import Image

    assert Image.open(out).size == (16, 16)
    before = out.read_bytes()
    assert main(args[:-1]) == 2  # exists, no --force: kept
    assert "--force" in capsys.readouterr().err and out.read_bytes() == before
    assert main(args[:-1] + ["--force", "--seed", "2"]) == 0


def test_generate_image_cli_jacobi(tiny_dir, tmp_path, capsys):
    from mmspec.cli import main

    args = ["generate-image", "a big red circle", "--target", str(tiny_dir("janus")), "--drafter", "untrained",
            "--out", str(tmp_path / "j.png"), "--draft", "jacobi", "--acceptance", "grouped", "--compare"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "[jacobi] window 16" in printed and "Grouped(k=8, delta=0.3" in printed and "autoregressive" in printed


@pytest.mark.parametrize("extra, match", [
    (["--draft", "drafter", "--window", "4"], "--window"),
    (["--acceptance", "lantern", "--group-delta", "0.3"], "does not read --group-delta"),
    (["--lantern-delta", "0.3"], "does not read --lantern-delta"),
    (["--acceptance", "lantern", "--lantern-delta", "1.5"], "delta"),
    (["--acceptance", "lantern++", "--lantern-lam", "0.5"], "lam"),
    (["--guidance-scale", "-1"], "guidance_scale"),
    (["--out", "x.txt"], "image extension"),
])
def test_generate_image_cli_errors(tiny_dir, tmp_path, capsys, extra, match):
    from mmspec.cli import main

    args = ["generate-image", "p", "--target", str(tiny_dir("janus")), "--drafter", "untrained",
            "--out", str(tmp_path / "y.png")]
    assert main(args + extra) == 2
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_generate_image_cli_refuses_a_vlm(tiny_dir, tmp_path, capsys):
    from mmspec.cli import main

    assert main(["generate-image", "p", "--target", str(tiny_dir("llava")), "--out", str(tmp_path / "z.png")]) == 2
    assert "generates text, not images" in capsys.readouterr().err


def test_train_drafter_on_prompt_lines(tiny_dir, tmp_path):
    """train-drafter on {"prompt"} lines for an image target: the target draws its own images; the drafter learns
    (held-out loss falls) and loads back as the pipeline's drafter; bad lines name the line."""
    from mmspec.cli import main
    from mmspec.train import TrainConfig, train_drafter

    data = tmp_path / "p.jsonl"
    data.write_text("".join(f'{{"prompt": "a {c} {s}"}}\n' for c in ("red", "blue", "green") for s in ("circle", "star")))
    short = train_drafter(str(tiny_dir("janus")), data, tmp_path / "d1", TrainConfig(max_steps=1, batch_size=4,
                                                                                    eval_fraction=0.34))
    long = train_drafter(str(tiny_dir("janus")), data, tmp_path / "d2", TrainConfig(max_steps=12, batch_size=4,
                                                                                   eval_fraction=0.34, lr=3e-3))
    assert long["held_out"]["depth1_loss"] < short["held_out"]["depth1_loss"]
    pipe = mmspec.load(tiny_dir("janus"), drafter=tmp_path / "d2", device="cpu")
    assert pipe.generate_image(PROMPTS[0], temperature=0.0).token_ids == reference(pipe, PROMPTS[0], 5.0)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"text": "no prompt"}\n')
    assert main(["train-drafter", "--target", str(tiny_dir("janus")), "--data", str(bad), "--out",
                 str(tmp_path / "d3")]) == 2
