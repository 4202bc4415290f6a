"""Review mends (issue 25): inputs that used to escape as a traceback, an overflow or a silent NaN now get a clear
one-line error (CLI: exit 2, no traceback) or a documented safe behaviour."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

import mmspec
from mmspec import Exact, Lantern, LanternPP, UserError
from mmspec.cli import main
from mmspec.images import MAX_PIXELS, load_image


@pytest.fixture(scope="module")
def vlm(tiny_dir):
    return mmspec.load(tiny_dir("llava"), "untrained", device="cpu")


@pytest.fixture(scope="module")
def gen(tiny_dir):
    return mmspec.load(tiny_dir("janus"), drafter="untrained", device="cpu")


def _one_line_exit_2(capsys, args, match):
    try:
        code = main(args)
    except SystemExit as e:  # argparse's own refusals exit from inside parse_args
        code = e.code
    assert code == 2
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


@pytest.fixture(scope="module")
def bombs(tmp_path_factory):
    """A decompression bomb past PIL's own hard limit (~179 M pixels: PIL raises its DecompressionBombError), and one
    past mmspec's limit that PIL would decode with only a warning. 1-bit PNGs of zeros: a few hundred KB each."""
    d = tmp_path_factory.mktemp("bombs")
    out = {}
    for name, size in (("pil", (15000, 13000)), ("mmspec", (9000, 8000))):
        Image.new("1", size).save(d / f"{name}.png")
        out[name] = d / f"{name}.png"
    return out


def test_decompression_bombs_are_user_errors(bombs, capsys):
    assert 9000 * 8000 > MAX_PIXELS
    for path in bombs.values():
        with pytest.raises(UserError, match="M pixels"):
            load_image(path)
    with pytest.raises(UserError, match="M pixels"):  # already decoded, but too large to hand to a processor
        load_image(Image.new("1", (9000, 8000)))
    # the CLI reads images before loading any model: one line, exit 2
    _one_line_exit_2(capsys, ["caption", str(bombs["pil"])], "M pixels")


@pytest.mark.parametrize("seed", [2**64, -1, 1.5, "7"])
def test_seed_out_of_range_is_named(vlm, gen, seed):
    with pytest.raises(UserError, match="seed"):
        vlm.generate("hi", max_new_tokens=2, temperature=1.0, seed=seed)
    with pytest.raises(UserError, match="seed"):
        gen.generate_image("a red circle", seed=seed)


def test_seed_largest_is_taken(vlm):
    assert len(vlm.generate("hi", max_new_tokens=2, temperature=1.0, seed=2**64 - 1).token_ids) == 2


def test_cli_seed_past_2_64_exits_2(capsys, tmp_path):
    flag = "--seed"
    _one_line_exit_2(capsys, ["caption", "x.png", flag, str(2**64)], "2**64")
    _one_line_exit_2(capsys, ["generate-image", "p", "--out", str(tmp_path / "a.png"), flag, "-3"], "2**64")
    _one_line_exit_2(capsys, ["bench", flag, str(2**70)], "2**64")


def test_seed_none_honours_torch_manual_seed(vlm, gen):
    """Like transformers' generate, seed=None samples from torch's global generator: torch.manual_seed fixes it."""
    runs = []
    for _ in range(2):
        torch.manual_seed(123)
        runs.append((vlm.generate("hi", max_new_tokens=8, temperature=1.0).token_ids,
                     gen.generate_image("a red circle").token_ids))
    assert runs[0] == runs[1]
    torch.manual_seed(124)
    assert gen.generate_image("a red circle").token_ids != runs[0][1]


@pytest.mark.parametrize("scale", [float("inf"), float("nan")])
def test_guidance_scale_must_be_finite(gen, scale):
    with pytest.raises(UserError, match="finite"):
        gen.generate_image("a red circle", guidance_scale=scale)


def test_cli_guidance_scale_inf_exits_2(capsys, tiny_dir, tmp_path):
    _one_line_exit_2(capsys, ["generate-image", "p", "--target", str(tiny_dir("janus")), "--drafter", "untrained",
                              "--out", str(tmp_path / "a.png"), "--guidance-scale", "inf"], "finite")
    _one_line_exit_2(capsys, ["bench", "--target", "mini-gen", "--guidance-scale", "inf"], "finite")


class _HalfRule:
    """Has the two methods the old check looked at, but not `relaxed`, `k` or `node_budget`, which the engine reads
    too."""

    def relax(self, residual, draft, neighbours, budget):
        return residual, 0.0

    def relaxed_mass(self, target_probs, tokens, neighbours=None):
        return target_probs.gather(1, tokens.reshape(-1, 1))[:, 0]


class _RelaxedWithoutK(_HalfRule):
    relaxed = True


class _NoBudget(_HalfRule):
    relaxed, k = True, 4


def test_custom_rule_is_checked_against_the_whole_protocol(vlm, gen):
    with pytest.raises(UserError, match="relaxed"):
        vlm.generate("hi", max_new_tokens=2, acceptance=_HalfRule())
    with pytest.raises(UserError, match="`k`"):
        gen.generate_image("a red circle", acceptance=_RelaxedWithoutK())
    with pytest.raises(UserError, match="node_budget"):
        gen.generate_image("a red circle", acceptance=_NoBudget())
    with pytest.raises(UserError, match="no method relax"):
        gen.generate_image("a red circle", acceptance=object())


def test_a_complete_custom_rule_works(gen):
    class Mine(_HalfRule):
        relaxed, k, node_budget = False, 0, 0.0

    want = gen.generate_image("a red circle", seed=3, acceptance=Exact()).token_ids
    assert gen.generate_image("a red circle", seed=3, acceptance=Mine()).token_ids == want


@pytest.mark.parametrize("rule", [Lantern, LanternPP])
def test_lantern_k_is_capped(rule):
    """k = 16383 on a 16k codebook would cache a 2.1 GB neighbour table for the target's life."""
    with pytest.raises(UserError, match="k <= 1024"):
        rule(k=16383)
    assert rule(k=1024).k == 1024
