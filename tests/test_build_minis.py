"""The rebuild path of the built-in models, at micro size, so it never rots."""

import json

import mmspec
from mmspec.data_tools.build_minis import PLANS, build, select_tasks
from mmspec.drafter import Drafter


def test_micro_build_produces_loadable_models(tmp_path):
    out, assets = tmp_path / "models", tmp_path / "assets"
    info = build(tmp_path / "work", out, PLANS["micro"], assets)
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == [
        "mini-vlm", "mini-vlm-assistant", "mini-vlm-eagle", "mini-vlm-vispec"]
    assert (assets / "sample_scene.png").is_file()
    recorded = json.loads((out / "build_info.json").read_text())
    assert recorded["plan"]["size"] == "micro" and set(recorded["drafters_held_out"]) == {"mini-vlm-vispec", "mini-vlm-eagle"}
    assert "count" in info["target_eval"] and "count" in info["target_test"]
    vispec = Drafter.from_pretrained(out / "mini-vlm-vispec")
    assert vispec.config.vision_adaptor and vispec.q_proj.weight.dtype.is_floating_point
    assert not Drafter.from_pretrained(out / "mini-vlm-eagle").config.vision_adaptor
    # the shipped fp16 files load back through the public API and decode losslessly
    pipe = mmspec.load(out / "mini-vlm", out / "mini-vlm-vispec", device="cpu")
    img = assets / "sample_scene.png"
    inputs = pipe.prepare("Describe the image.", [img])
    ref = pipe.target.generate(**inputs, do_sample=False, max_new_tokens=12)[0, inputs["input_ids"].shape[1]:].tolist()
    assert pipe.generate("Describe the image.", [img], max_new_tokens=12).token_ids == ref
    # a second run finds every stage built and only re-installs
    again = build(tmp_path / "work", out, PLANS["micro"], assets)
    assert "target" not in again["stages_s"] and "mini-vlm-vispec" not in again["stages_s"]


def test_select_tasks_keeps_shares_per_task_and_answer(tmp_path):
    rows = [{"task": "count", "answer": str(i % 3)} for i in range(300)] + [{"task": "colour", "answer": "red"}] * 100
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("".join(json.dumps(r) + "\n" for r in rows[:200]))
    b.write_text("".join(json.dumps(r) + "\n" for r in rows[200:]))
    dst = tmp_path / "mix.jsonl"
    # "count:1" overrides "count"; tasks missing from a file's shares are dropped; a seed fixes the selection
    kept = select_tasks([(a, {"count": 1.0, "count:1": 0.0}), (b, {"colour": 0.5})], dst, seed=0)
    out = [json.loads(line) for line in dst.read_text().splitlines()]
    assert kept == len(out)
    assert sum(r["task"] == "count" for r in out) == sum(r["answer"] != "1" for r in rows[:200])
    assert not any(r["task"] == "count" and r["answer"] == "1" for r in out)
    assert 30 <= sum(r["task"] == "colour" for r in out) <= 70
    first = dst.read_text()
    select_tasks([(a, {"count": 1.0, "count:1": 0.0}), (b, {"colour": 0.5})], dst, seed=0)
    assert dst.read_text() == first
