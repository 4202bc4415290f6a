"""TreeConfig.preset("auto"): the tuner's tau model is what decoding gives, its choice is cached per machine, and a
bad cache is measured again rather than trusted."""

import json

import pytest

import mmspec
from mmspec import TreeConfig
from mmspec import autotune, tuning
from mmspec.config import AutoTreeConfig
from mmspec.errors import InputError
from mmspec.registry import MODELS_DIR

pytestmark = pytest.mark.skipif(not (MODELS_DIR / "mini-vlm").is_dir(), reason="built-in models not built")


@pytest.fixture(scope="module")
def pipe():
    return mmspec.load("mini-vlm", device="cpu", tree=TreeConfig.preset("cpu"), draft_dtype="float32")


def test_simulated_tau_is_the_decoded_tau(pipe):
    """Trees read off the full beam along the target's greedy continuation accept what decoding with that shape
    accepts: the tuner ranks shapes by the tau they really give (up to float ties between near-equal drafts)."""
    prompt = autotune.calibration_prompts(pipe, 1)[0]
    run = autotune.teacher_forced_pools(pipe, prompt, max_new_tokens=48)
    for shape in (TreeConfig(depth=5, top_k=4, total_tokens=16), TreeConfig(depth=3, top_k=2, total_tokens=6)):
        simulated = autotune.simulate_tau(run["pools"][shape.top_k], run["tokens"], shape.top_k, shape.depth,
                                          shape.total_tokens)
        probe = mmspec.Pipeline(pipe.target, pipe.processor, pipe.adapter, pipe.drafter, shape)
        res = probe.generate(*prompt, max_new_tokens=48)
        assert res.token_ids == run["tokens"]
        decoded = (res.stats.new_tokens - 1) / (res.stats.target_forwards - 1)
        assert abs(simulated - decoded) < 0.1, (shape, simulated, decoded)
        assert simulated > 2.0  # the shipped drafter accepts long paths: a mis-walk would give ~1


def test_auto_is_measured_once_then_read_from_the_cache(monkeypatch):
    pipe = mmspec.load("mini-vlm", device="cpu", tree=TreeConfig.preset("auto"))
    assert not isinstance(pipe.tree, AutoTreeConfig) and pipe.tree.total_tokens > 1
    entry = json.loads(tuning.cache_file().read_text())
    (key, stored), = [(k, v) for k, v in entry.items() if "mini-vlm + builtin" in k]
    assert stored["tree"] == {"depth": pipe.tree.depth, "top_k": pipe.tree.top_k, "total_tokens": pipe.tree.total_tokens}
    assert stored["verify_ms"]["16"] > 0 and stored["expected_tau"] > 1

    def no_measuring(*a, **k):
        raise AssertionError("measured again despite the cache")

    monkeypatch.setattr(autotune, "measure_verify", no_measuring)
    again = mmspec.load("mini-vlm", device="cpu", tree=TreeConfig.preset("auto"))
    assert again.tree == pipe.tree
    monkeypatch.undo()

    tuning.cache_file().write_text(json.dumps({key: {"tree": {"depth": 0}}}))  # not an entry this version wrote
    assert mmspec.load("mini-vlm", device="cpu", tree=TreeConfig.preset("auto")).tree.total_tokens > 1
    tuning.cache_file().write_text("{not json")  # a torn or hand-edited cache is measured again, not trusted
    third = mmspec.load("mini-vlm", device="cpu", tree=TreeConfig.preset("auto"))
    assert third.tree.total_tokens > 1 and key in json.loads(tuning.cache_file().read_text())


def test_tree_config_checks_min_confidence():
    assert TreeConfig(min_confidence=0.2).min_confidence == 0.2
    for bad in (-0.1, 1.0, "0.2", True):
        with pytest.raises(InputError, match="min_confidence"):
            TreeConfig(min_confidence=bad)
    assert isinstance(TreeConfig.preset("auto"), TreeConfig)


def test_min_confidence_stops_drafting_early(pipe):
    """Below the floor the beam stops growing: fewer drafter forwards, the output unchanged."""
    prompt = autotune.calibration_prompts(pipe, 1)[0]
    runs = {}
    for floor in (0.0, 0.6):
        probe = mmspec.Pipeline(pipe.target, pipe.processor, pipe.adapter, pipe.drafter,
                                TreeConfig(depth=6, top_k=4, total_tokens=16, min_confidence=floor))
        runs[floor] = probe.generate(*prompt, max_new_tokens=48)
    assert runs[0.6].token_ids == runs[0.0].token_ids
    per_step = {f: r.stats.draft_forwards / (r.stats.target_forwards - 1) for f, r in runs.items()}
    assert per_step[0.6] < per_step[0.0], per_step


def test_simulate_tau_walks_the_reranked_tree():
    """A hand-made pool (top_k 2, depth 2): root children a (-0.1) and b (-2); a's children c (-0.2), d (-3); b's
    children e (-2.5), f (-4). Along g = r, a, c, x the full tree accepts a and c (3 tokens a step); a 3-token tree
    keeps a and c too; a depth-1 tree only a; a 2-token tree only a."""
    a, b, c, d, e, f = 10, 11, 12, 13, 14, 15
    pool = ([a, b, c, d, e, f], [-1, -1, 0, 0, 1, 1], [-0.1, -2.0, -0.2, -3.0, -2.5, -4.0])
    g = [1, a, c, 99]  # g[0] is the root; after one step of 3 tokens nothing is left to draft
    pools = [pool, pool, pool]
    assert autotune.simulate_tau(pools, g, 2, 2, 7) == 3.0
    assert autotune.simulate_tau(pools, g, 2, 2, 3) == 3.0
    # depth 1: a accepted, then from position 2 (root c) the pool offers a, b: no match for 99 -> 1 token
    assert autotune.simulate_tau(pools, g, 2, 1, 3) == 1.5
    assert autotune.simulate_tau(pools, g, 2, 2, 2) == 1.5


def test_retune_env_measures_again(monkeypatch):
    entry = {"tree": {"depth": 2, "top_k": 2, "total_tokens": 3}}
    assert tuning.cached_tree(entry)[0] == TreeConfig(depth=2, top_k=2, total_tokens=3)
    monkeypatch.setenv("MMSPEC_RETUNE", "1")
    assert tuning.cached_tree(entry) is None  # a cached shape is ignored: measured again, then overwritten
