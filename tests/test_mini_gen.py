"""The built-in mini-gen with its drafter (slow layer): exact greedy codes equal Janus's own generate, drafts get
accepted, and LANTERN accepts more than the exact rule on the same prompts and seeds."""

from __future__ import annotations

import pytest

import mmspec
from mmspec import Exact, Lantern

pytestmark = pytest.mark.slow
PROMPTS = ["a big red circle at the top left", "two small blue squares on the right and a yellow star in the center"]


@pytest.fixture(scope="module")
def pipe():
    return mmspec.load("mini-gen", device="cpu")


@pytest.mark.parametrize("prompt", PROMPTS)
def test_exact_greedy_equals_generate(pipe, prompt):
    model = pipe.target
    model.generation_config.generation_kwargs = {"boi_token_id": pipe.boi_token_id}  # from_pretrained drops it
    ref = model.generate(**pipe.prepare(prompt), generation_mode="image", do_sample=False, guidance_scale=5.0)
    res = pipe.generate_image(prompt, temperature=0.0)
    assert res.token_ids == ref[0].tolist()
    assert res.stats.mean_accepted > 1.2  # the shipped drafter gets drafts accepted
    assert res.image.size == pipe.image_of(res.token_ids).size


def test_lantern_accepts_more_than_exact(pipe):
    taus = {}
    for name, rule in (("exact", Exact()), ("lantern", Lantern(k=8, delta=0.2))):
        runs = [pipe.generate_image(p, seed=s, acceptance=rule) for p in PROMPTS for s in (0, 1)]
        taus[name] = sum(r.stats.new_tokens for r in runs) / sum(r.stats.target_forwards for r in runs)
    assert taus["lantern"] > taus["exact"] * 1.1, taus
