"""The benches honour or refuse every flag (issue 25), keep the quality keys when quality is skipped, and time their
methods one way (bench.take_turns), as the CLI's --compare does."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from mmspec import TreeConfig
from mmspec.bench import take_turns
from mmspec.cli import main


def _exit_2(capsys, args, match):
    try:
        code = main(args)
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and match in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err


@pytest.mark.parametrize("args, match", [
    (["--target", "mini-gen", "--max-new-tokens", "5"], "--max-new-tokens applies to VLM targets"),
    (["--target", "mini-gen", "--methods", "eagle"], "--methods applies to VLM targets"),
    (["--target", "mini-gen", "--plot", "p.png", "--no-quality"], "--no-quality"),
    (["--plot", "p.png"], "--plot applies to image generators"),
    (["--no-quality"], "--no-quality applies to image generators"),
])
def test_a_flag_the_bench_would_ignore_is_refused(args, match, capsys, monkeypatch):
    import mmspec.bench
    import mmspec.bench_image

    for mod, name in ((mmspec.bench, "run_bench"), (mmspec.bench_image, "run_image_bench")):
        monkeypatch.setattr(mod, name, lambda *a, **k: pytest.fail("the bench ran"))
    _exit_2(capsys, ["bench", *args], match)


def test_image_bench_honours_draft_dtype(monkeypatch):
    import mmspec.bench_image

    seen = {}
    monkeypatch.setattr(mmspec.bench_image, "run_image_bench", lambda *a, **k: seen.update(k) or {})
    assert main(["bench", "--target", "mini-gen", "--draft-dtype", "bfloat16", "--no-quality"]) == 0
    assert seen["draft_dtype"] == "bfloat16" and seen["quality"] is False


def test_any_janus_checkpoint_gets_the_image_bench(tiny_dir, monkeypatch):
    """The image bench is chosen by the target's config, so a user's Janus directory gets it too, not only mini-gen."""
    import mmspec.bench
    import mmspec.bench_image

    seen = {}
    monkeypatch.setattr(mmspec.bench_image, "run_image_bench", lambda target, **k: seen.update(k, target=target) or {})
    monkeypatch.setattr(mmspec.bench, "run_bench", lambda *a, **k: pytest.fail("the VLM bench ran"))
    janus = str(tiny_dir("janus"))
    assert main(["bench", "--target", janus, "--no-sweep", "--no-quality"]) == 0
    assert seen["target"] == janus and seen["sweep"] is False


def test_quality_keys_are_null_without_quality():
    from mmspec.bench_image import QUALITY_KEYS, _report, _settings

    settings = _settings(sweep=True, has_drafter=True)
    stats = SimpleNamespace(prefill_s=0.1, draft_s=0.1, verify_s=0.2, other_s=0.1, wall_s=0.5, target_forwards=4)
    for s in settings.values():
        s.add_image(SimpleNamespace(image=None, token_ids=[1] * 16, stats=stats))
    pipe = SimpleNamespace(tree_for=lambda rule: TreeConfig(), device="cpu", tree=TreeConfig())
    report = _report("mini-gen", pipe, 1, {"guidance_scale": 5.0, "temperature": 1.0}, settings, {}, {"exact": True})
    assert report["hardware"].endswith("bf16")  # the CPU is named with the JSON: figures from two CPUs differ
    for row in list(report["methods"].values()) + report["sweep"]:
        assert {k: row[k] for k in QUALITY_KEYS} == dict.fromkeys(QUALITY_KEYS)


def test_take_turns_warms_up_then_rotates():
    calls = []
    take_turns(["a", "b", "c"], 4, lambda m, k: calls.append((m, k)), lambda m: calls.append((m, "warm")))
    assert calls[:3] == [("a", "warm"), ("b", "warm"), ("c", "warm")]
    assert [m for m, _ in calls[3:]] == list("abc" "bca" "cab" "abc")
    assert [k for _, k in calls[3:]] == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3


# ---- host syncs: on a GPU every read of a tensor's value by the host waits for the device ---------------------------


def _syncs_per_step(pipe, temperature: float) -> float:
    """Host reads per verify step of the loop alone: a run minus a prefill-only run, over the steps between."""
    from mmspec.bench import count_host_syncs

    with count_host_syncs() as prefill:
        pipe.generate("hi", max_new_tokens=1, temperature=temperature, seed=0)
    with count_host_syncs() as run:
        res = pipe.generate("hi", max_new_tokens=24, temperature=temperature, seed=0)
    return (run["n"] - prefill["n"]) / (res.stats.target_forwards - 1)


@pytest.fixture(scope="module")
def narrow_and_wide(tiny_dir):
    import mmspec

    return [mmspec.load(tiny_dir("llava"), "untrained", device="cpu", tree=TreeConfig(depth=3, top_k=k, total_tokens=t))
            for k, t in ((2, 6), (8, 24))]


def test_count_host_syncs_counts_value_reads():
    import torch

    from mmspec.bench import count_host_syncs

    t = torch.arange(4)
    with count_host_syncs() as c:
        t.tolist(), int(t[0]), float(t[1]), bool(t[2]), t[3].item()
    assert c["n"] == 5
    with count_host_syncs() as c:
        t + 1
    assert c["n"] == 0


def test_greedy_steps_sync_a_fixed_number_of_times_whatever_the_tree_width(narrow_and_wide):
    narrow, wide = (_syncs_per_step(p, 0.0) for p in narrow_and_wide)
    # within one read: steps that commit more tokens read a few more, but one read per sibling would add ~6 per depth
    assert abs(narrow - wide) < 1 and narrow <= 24, (narrow, wide)


def test_sampling_steps_sync_a_fixed_number_of_times_whatever_the_tree_width(narrow_and_wide):
    narrow, wide = (_syncs_per_step(p, 1.0) for p in narrow_and_wide)
    assert abs(narrow - wide) < 1, (narrow, wide)


def test_bench_rows_report_host_syncs_per_step():
    from mmspec.bench import MethodResult, method_rows

    ar = MethodResult(tokens=[[1, 2]], new_tokens=2, target_forwards=2, wall_s=1.0, host_syncs_per_step=12.5)
    assert method_rows({"autoregressive": ar}, greedy=True)["autoregressive"]["host_syncs_per_step"] == 12.5


def test_tradeoff_plot_draws_headline_and_sweep_points(tmp_path):
    from PIL import Image

    from mmspec.bench_image import plot_tradeoff
    from mmspec.errors import InputError

    row = lambda f, s: {"faithfulness": f, "speedup": s}  # noqa: E731
    report = {"target": "t", "n_prompts": 2, "guidance_scale": 5.0, "temperature": 1.0,
              "methods": {"autoregressive": row(0.95, 1.0), "sjd": row(0.9, 2.0)},
              "sweep": [{"label": "jacobi w=4 left Exact()", **row(0.93, 1.5)}, {"label": "x", **row(None, 9.0)}]}
    img = Image.open(plot_tradeoff(report, tmp_path / "p.png")).convert("RGB")
    colours = {colour for _, colour in img.getcolors(maxcolors=1 << 16)}
    assert (150, 210, 150) in colours and img.getpixel((0, 0)) == (255, 255, 255)  # the Jacobi sweep point is drawn
    report["methods"] = {k: row(None, v["speedup"]) for k, v in report["methods"].items()}
    with pytest.raises(InputError, match="faithfulness"):
        plot_tradeoff(report, tmp_path / "q.png")
