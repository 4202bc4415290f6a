"""mmspec.quality: the Frechet distance against closed forms, mini-clip's CLIPScore on rendered scenes, and the
mini-vlm faithfulness judge on rendered scenes against their own and against wrong scenes."""

import json

import pytest
import torch

from mmspec import quality
from mmspec.data_tools import gen_world
from mmspec.data_tools.shapes_world import COLOURS
from mmspec.errors import InputError, MissingInputError
from mmspec.registry import MODELS_DIR

needs_clip = pytest.mark.skipif(not (quality.MINI_CLIP_DIR / quality.WEIGHTS_FILE).is_file(),
                                reason="mini-clip not built")
needs_vlm = pytest.mark.skipif(not (MODELS_DIR / "mini-vlm").is_dir(), reason="mini-vlm not built")


def _world(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    scenes = [gen_world.sample_gen_scene(g) for _ in range(n)]
    return scenes, [gen_world.render_textured(s) for s in scenes], [gen_world.prompt_of(s, g) for s in scenes]


@pytest.fixture(scope="module")
def clip():
    pytest.importorskip("open_clip")
    return quality.load_clip()


# --------------------------------------------------------------------------------------------- Frechet distance
def test_frechet_distance_closed_forms():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(400, 8, generator=g) * torch.linspace(0.5, 2, 8) + 1.0
    assert quality.frechet_distance(a, a) < 1e-8
    # b = 2a: S_b = 4 S_a commutes with S_a, so FD = |mu_a|^2 + tr(S_a) + 4 tr(S_a) - 2 * 2 tr(S_a) exactly.
    s_a = torch.cov(a.double().T)
    expect = float(a.double().mean(0).square().sum() + torch.trace(s_a))
    assert quality.frechet_distance(a, 2 * a) == pytest.approx(expect, rel=1e-6)
    # A pure mean shift of 0.5 in every one of the 8 dimensions: 8 * 0.25, covariances cancel.
    assert quality.frechet_distance(a, a + 0.5) == pytest.approx(2.0, rel=1e-6)


def test_frechet_distance_with_fewer_samples_than_dimensions():
    """Singular covariances (N < D, the usual bench case) give a finite, non-negative distance, ~0 for a set with
    itself and symmetric in its arguments."""
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(6, 32, generator=g), torch.randn(5, 32, generator=g) + 0.3
    assert quality.frechet_distance(a, a) < 1e-8
    ab, ba = quality.frechet_distance(a, b), quality.frechet_distance(b, a)
    assert ab > 1 and ab == pytest.approx(ba, rel=1e-6)
    with pytest.raises(InputError):
        quality.frechet_distance(a[:1], b)


# ---------------------------------------------------------------------------------------------------- mini-clip
def test_word_tokenizer():
    tok = quality.WordTokenizer(["a", "red", "circle"], context_length=6)
    ids = tok(["A red circle!", "a purple circle", "a red circle a red circle"])
    eot = len(tok.vocab) - 1
    assert ids.shape == (3, 6) and ids[0].tolist() == [2, 3, 4, 5, eot, 0]
    assert ids[1, 2].item() == tok.ids[quality.UNK]
    assert ids[2, -1].item() == eot and (ids.argmax(-1) == torch.tensor([4, 4, 5])).all()  # argmax pooling spot


def test_load_clip_errors_clearly_when_missing(tmp_path):
    with pytest.raises(MissingInputError, match="mini-clip not found.*train_clip"):
        quality.load_clip(tmp_path)
    (tmp_path / quality.CONFIG_FILE).write_text(json.dumps({"model_cfg": {}}))
    with pytest.raises(MissingInputError, match=quality.WEIGHTS_FILE):
        quality.load_clip(tmp_path)
    (tmp_path / quality.WEIGHTS_FILE).write_bytes(b"")
    with pytest.raises(InputError, match="not a mini-clip config"):
        quality.load_clip(tmp_path)


@needs_clip
def test_clip_score_prefers_matching_prompts(clip):
    _, images, prompts = _world(48, seed=7)
    match = quality.clip_score(images, prompts, clip)
    shuffled = quality.clip_score(images, prompts[1:] + prompts[:1], clip)
    assert match > shuffled + 5, (match, shuffled)
    assert quality.clip_score(images, prompts, clip) == match  # deterministic
    with pytest.raises(InputError):
        quality.clip_score(images, prompts[:-1], clip)


@needs_clip
def test_clip_retrieves_the_right_image(clip):
    _, images, prompts = _world(32, seed=8)
    img = torch.nn.functional.normalize(clip.encode_images(images), dim=-1)
    txt = torch.nn.functional.normalize(clip.encode_texts(prompts), dim=-1)
    top1 = ((txt @ img.T).argmax(1) == torch.arange(32)).float().mean().item()
    assert top1 > 0.3  # chance is 1/32


@needs_clip
def test_fid_of_rendered_scenes(clip):
    _, images, _ = _world(40, seed=9)
    _, others, _ = _world(40, seed=10)
    darker = [im.point(lambda v: v // 2) for im in images]
    same = quality.fid(images, images, clip)
    fresh = quality.fid(images, others, clip)  # the same distribution, other samples: sampling noise only
    shifted = quality.fid(images, darker, clip)
    assert same < 1e-6 * max(1.0, fresh)
    assert shifted > 2 * fresh > 0, (same, fresh, shifted)


# ------------------------------------------------------------------------------------------------- faithfulness
@pytest.fixture(scope="module")
def judge():
    import mmspec

    return mmspec.load("mini-vlm", device="cpu")


@needs_vlm
def test_faithfulness_own_scenes_high_wrong_scenes_low(judge):
    scenes, images, _ = _world(6, seed=3)
    own = quality.faithfulness(images, scenes, judge)
    # Each image against the next one's scene, which differs in count or colours for every pair with this seed.
    wrong_scenes = scenes[1:] + scenes[:1]
    assert all(quality.expected_of(a) != quality.expected_of(b) for a, b in zip(scenes, wrong_scenes))
    wrong = quality.judge_images(images, wrong_scenes, judge)
    assert own >= 5 / 6 and sum(r["faithful"] for r in wrong) <= 1, (own, wrong)
    # Stopping at the first failed check is a fast path: the full check list gives the same verdicts.
    full = quality.judge_images(images[:3], wrong_scenes[:3], judge, full=True)
    assert [r["faithful"] for r in full] == [r["faithful"] for r in wrong[:3]]
    assert all(r["count_ok"] is not None and r["absent_ok"] is not None and r["colours_ok"] is not None for r in full)


@needs_vlm
def test_absent_colour_probe_can_fail(judge):
    """An image claimed to lack a colour it shows fails the absent probe, even when count and colours match."""
    scenes, images, _ = _world(1, seed=4)
    exp = gen_world.expected_answers(scenes[0])
    shown = sorted(exp["colours"])[0]
    rec = quality.judge_images(images, [{"count": exp["count"], "colours": exp["colours"]}], judge)[0]
    assert rec["faithful"] and rec["absent"] not in exp["colours"]
    # Claim every colour but one the image shows: that one is the only candidate for the absent probe.
    lying = quality.judge_images(images, [{"count": exp["count"], "colours": set(COLOURS) - {shown}}], judge)[0]
    assert lying["absent"] == shown and not lying["absent_ok"] and not lying["faithful"]


def test_expected_of_matches_gen_world():
    """A Scene and gen_world's expected-answers dict ask the judge the same questions."""
    for scene in _world(20, seed=5)[0]:
        assert quality.expected_of(scene) == quality.expected_of(gen_world.expected_answers(scene))
        assert quality.expected_of(scene) == gen_world.expected_answers(scene)


def test_expected_of_rejects_bad_input():
    with pytest.raises(InputError):
        quality.expected_of({"count": 1, "colours": {"mauve"}})
    with pytest.raises(TypeError):
        quality.expected_of("a red circle")
