"""The pieces issue #23's deep build added: the hardware probes, sharded data, the encoded training set, the clock
that caps a stage in minutes, the full description check and the per-block residual updates."""

import json
import time

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from mmspec import hardware, pipeline
from mmspec.data_tools import train_target as tt
from mmspec.data_tools.shapes_world import TASKS, make_dataset
from mmspec.data_tools.target_data import collate, encode_set, make_dataset_sharded
from mmspec.data_tools.target_eval import description_correct, residual_updates
from tiny_models import micro_mini_vlm


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    root = tmp_path_factory.mktemp("deep_build")
    return (root, *micro_mini_vlm(root, n=24, seed=11))


def test_one_bf16_probe_for_library_and_builders():
    assert pipeline.cpu_native_bf16 is hardware.cpu_native_bf16
    assert hardware.native_bf16(torch.device("cpu")) == hardware.cpu_native_bf16()
    assert hardware.training_device("cpu").type == "cpu"
    assert hardware.training_device().type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert hardware.describe_device(torch.device("cpu"))


def test_sharded_data_is_fixed_by_shards_not_processes(tmp_path):
    one = make_dataset_sharded(30, tmp_path / "a", seed=3, tasks=TASKS, split="train", shards=3, workers=1)
    two = make_dataset_sharded(30, tmp_path / "b", seed=3, tasks=TASKS, split="train", shards=3, workers=2)
    assert one.read_text() == two.read_text() and len(one.read_text().splitlines()) == 30
    names = [p for line in one.read_text().splitlines() for p in json.loads(line)["images"]]
    assert len(set(names)) == len(names) and all((tmp_path / "a" / p).is_file() for p in names)
    assert not list((tmp_path / "a").glob("train-*.jsonl"))  # the shards were joined and removed


def test_encoded_set_matches_the_processor(micro):
    _, data, init = micro
    processor = AutoProcessor.from_pretrained(str(init))
    records = tt.load_records(data)
    serial, forked = encode_set(processor, records, workers=1), encode_set(processor, records, workers=2, chunk=5)
    assert serial.encoded == forked.encoded and torch.equal(serial.pixels, forked.pixels)
    for i in (0, len(records) - 1):
        assert serial.encoded[i] == tt.encode_example(processor, records[i])
        reference = processor.image_processor(tt.load_scene_images(records[i]["images"]), return_tensors="pt")
        assert torch.allclose(serial.pixels[serial.image_rows[i]].float(), reference["pixel_values"], atol=2e-3)
    batch = collate(serial, [0, 1, 2], 4, processor.tokenizer.pad_token_id, torch.device("cpu"))
    assert batch["pixel_values"].shape[0] == sum(len(records[i]["images"]) for i in (0, 1, 2))
    cells, patches = batch["scene_labels"]
    assert cells.shape[1:] == (9, 3) and patches.shape[1:] == (16, 3)


def test_clock_caps_a_stage_in_minutes():
    clock = tt.Clock(1e-3, steps=1000, warmup=0.05)
    assert clock.progress(500) == 0.5 and clock.lr_at(0.0) <= 1e-3 and clock.lr_at(0.05) == pytest.approx(1e-3)
    assert clock.lr_at(1.0) == pytest.approx(1e-4)
    capped = tt.Clock(1e-3, steps=10, warmup=0.5, minutes=0.001)  # 60 ms
    time.sleep(0.08)
    assert capped.progress(1) == 1.0
    assert max(tt.Clock(1e-3, steps=2, warmup=0.05).lr_at(p) for p in (0.0, 0.01, 0.5)) <= 1e-3


def test_minutes_cap_ends_training_early(micro, tmp_path):
    _, data, init = micro
    metrics = tt.train_target(init, data, tmp_path / "o", steps=10_000, batch_size=4, seed=0, bf16=False,
                              minutes=0.02, device="cpu")
    assert 1 <= metrics["steps"] < 10_000 and metrics["minutes_cap"] == 0.02 and metrics["device"] == "cpu"


def test_description_check_wants_objects_and_counts(tmp_path):
    make_dataset(40, tmp_path, seed=5, tasks=["describe"], split="d")
    records = [json.loads(line) for line in (tmp_path / "d.jsonl").read_text().splitlines()]
    assert all(description_correct(r, r["messages"][1]["content"]) for r in records)
    r = next(r for r in records if len(r["scene"]["objects"]) >= 2)
    text = r["messages"][1]["content"]
    opening, rest = text.split(".", 1)
    n = len(r["scene"]["objects"])
    words = ["zero", "one", "two", "three", "four", "five"]
    assert not description_correct(r, opening.replace(words[n], words[n + 1]) + "." + rest)  # miscounted
    assert not description_correct(r, opening + ".")  # no objects named
    summary_cut = text[: max(text.rfind("In total"), text.rfind("Altogether"), text.rfind("Summary"))]
    assert not description_correct(r, summary_cut)  # every object right, but no counts


def test_residual_updates_cover_every_block(micro):
    _, data, init = micro
    model = AutoModelForImageTextToText.from_pretrained(str(init)).eval()
    processor = AutoProcessor.from_pretrained(str(init))
    updates = residual_updates(model, processor, tt.load_records(data)[:6], batch_size=4)
    assert len(updates) == model.config.text_config.num_hidden_layers and all(u > 0 for u in updates)
    # a block turned into the identity (its output projections zeroed) reports no update
    layer = model.model.language_model.layers[0]
    torch.nn.init.zeros_(layer.self_attn.o_proj.weight)
    torch.nn.init.zeros_(layer.mlp.down_proj.weight)
    assert residual_updates(model, processor, tt.load_records(data)[:6])[0] == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("after, kept", [(0.75, "mini-vlm-qa"), (0.85, "mini-vlm-count"), (0.9, "mini-vlm-count")])
def test_counting_stage_becomes_the_target_only_when_it_grades_no_worse(tmp_path, after, kept):
    from mmspec.data_tools.build_minis import _promote

    qa, count, target = tmp_path / "mini-vlm-qa", tmp_path / "mini-vlm-count", tmp_path / "mini-vlm"
    for d, overall, weights in ((qa, 0.85, b"qa"), (count, after, b"count")):
        d.mkdir()
        (d / "model.safetensors").write_bytes(weights)
        (d / "train_metrics.json").write_text(json.dumps({"monitor": [{"overall": 0.1}, {"overall": overall}]}))
    (count / "tokenizer.json").write_text("{}")
    _promote(qa, count, target)
    assert (target / "model.safetensors").read_bytes() == (b"qa" if kept == "mini-vlm-qa" else b"count")
    assert json.loads((target / "train_metrics.json").read_text())["kept"]["weights_of"] == kept
    assert (target / "tokenizer.json").exists() and not (tmp_path / "mini-vlm.partial").exists()


def test_a_paused_generator_step_counts_as_a_few_mean_steps():
    """The generator's schedule follows training minutes: a step that took far longer than the mean (the build was
    paused) adds PAUSE_FACTOR mean steps, not the pause; a normal step adds its own time."""
    from mmspec.data_tools import train_gen

    state = {"elapsed": 100.0, "step": 50}  # a 2-second mean step
    assert train_gen._step_seconds(time.perf_counter() - 600, state) == pytest.approx(train_gen.PAUSE_FACTOR * 2)
    assert train_gen._step_seconds(time.perf_counter() - 3, state) == pytest.approx(3, abs=0.5)
