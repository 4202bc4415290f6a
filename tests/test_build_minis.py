"""The rebuild path of the built-in models, at micro size, so it never rots."""

import json
import shutil

import torch
from safetensors.torch import load_file

import mmspec
from mmspec.data_tools.build_minis import PLANS, build, select_tasks
from mmspec.drafter import Drafter

SHIPPED = ("mini-vlm", "mini-vlm-assistant", "mini-vlm-eagle", "mini-vlm-vispec")
STAGES = {"eval-data", "data", "drafter-data", "tokenizer", "target", "target-qa", "count-data", "target-count",
          "target-eval", "target-test", "target-residuals", "regenerate", "mini-vlm-vispec", "mini-vlm-eagle",
          "assistant"}


def _files(root):
    """Each file under root with its modification time: a stage that reruns rewrites its outputs."""
    return {p.relative_to(root): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def test_micro_build_produces_loadable_models(tmp_path):
    out, assets = tmp_path / "models", tmp_path / "assets"
    info = build(tmp_path / "work", out, PLANS["micro"], assets)
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == list(SHIPPED)
    assert (assets / "sample_scene.png").is_file()
    recorded = json.loads((out / "build_info.json").read_text())
    assert recorded["plan"]["size"] == "micro" and set(recorded["drafters_held_out"]) == {"mini-vlm-vispec", "mini-vlm-eagle"}
    assert "count" in info["target_eval"] and "count" in info["target_test"]
    vispec = Drafter.from_pretrained(out / "mini-vlm-vispec")
    assert vispec.config.vision_adaptor
    assert not Drafter.from_pretrained(out / "mini-vlm-eagle").config.vision_adaptor
    # The shipped files are the trained weights, rounded to fp16. Comparing the pipeline with its own target (below)
    # cannot see this: an untrained or wrongly copied model decodes just as losslessly against itself.
    work = tmp_path / "work"
    for name in SHIPPED:
        trained = load_file(str(work / name / "model.safetensors"))
        shipped = load_file(str(out / name / "model.safetensors"))
        assert shipped.keys() == trained.keys(), name
        for key, w in trained.items():
            expected = w.half() if w.is_floating_point() else w
            assert shipped[key].dtype == expected.dtype and torch.equal(shipped[key], expected), (name, key)
    # they load back through the public API and decode losslessly
    pipe = mmspec.load(out / "mini-vlm", out / "mini-vlm-vispec", device="cpu")
    img = assets / "sample_scene.png"
    inputs = pipe.prepare("Describe the image.", [img])
    ref = pipe.target.generate(**inputs, do_sample=False, max_new_tokens=12)[0, inputs["input_ids"].shape[1]:].tolist()
    assert pipe.generate("Describe the image.", [img], max_new_tokens=12).token_ids == ref

    # A second run finds every stage built and only re-installs: no stage runs (the first run shows every stage's
    # name is recorded, so an empty record means something), no intermediate file is rewritten, and the shipped
    # models, removed here, come back byte for byte.
    assert set(info["stages_s"]) == STAGES
    before_work = _files(work)
    before_out = {name: (out / name / "model.safetensors").read_bytes() for name in SHIPPED}
    shutil.rmtree(out)
    again = build(work, out, PLANS["micro"], assets)
    assert again["stages_s"] == {}, again["stages_s"]
    after_work = _files(work)
    changed = {f for f in after_work.keys() | before_work.keys() if after_work.get(f) != before_work.get(f)}
    assert not changed, changed
    assert {name: (out / name / "model.safetensors").read_bytes() for name in SHIPPED} == before_out

    # The GPU shot (docs/mini-models.md): the graded target and the stage records, brought back alone, resume on
    # another machine with the seeded data redrawn and only the drafters trained.
    moved = tmp_path / "moved"
    for path in ("mini-vlm", "mini-vlm-joint/train_metrics.json", "mini-vlm-qa/train_metrics.json", "stages.json"):
        (moved / path).parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if (work / path).is_dir() else shutil.copy)(work / path, moved / path)
    resumed = build(moved, tmp_path / "models-moved", PLANS["micro"])
    assert set(resumed["stages_s"]) == {"eval-data", "drafter-data", "regenerate", "mini-vlm-vispec", "mini-vlm-eagle",
                                        "assistant"}
    assert resumed["target_test"] == info["target_test"]


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
