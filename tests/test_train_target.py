"""The mini-vlm build path on a micro model: build, train a few steps, save, reload through the Auto classes, generate."""

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from mmspec.data_tools import train_target as tt
from mmspec.data_tools.shapes_world import Obj, Scene
from tiny_models import micro_mini_vlm


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    root = tmp_path_factory.mktemp("micro_target")
    return (root, *micro_mini_vlm(root, n=30, seed=3))


def test_labels_cover_exactly_the_assistant_tokens(micro):
    _, data, init = micro
    processor = AutoProcessor.from_pretrained(str(init))
    tok = processor.tokenizer
    records = tt.load_records(data)
    assert {r["task"] for r in records} >= {"describe", "compare"}
    for r in records:
        ids, labels = tt.encode_example(processor, r)
        text = processor.apply_chat_template(tt.chat_messages(r), tokenize=False)
        reference = processor(text=[text], images=tt.load_scene_images(r["images"]), return_tensors="pt")
        # The ids are those the processor itself produces (image tokens expanded), for one and for two images.
        assert ids == reference["input_ids"][0].tolist()
        assert ids.count(tok.convert_tokens_to_ids("<image>")) == len(r["images"]) * tt.image_token_count(processor)
        # The labelled tokens are one contiguous run at the end: " answer</s>".
        first = next(i for i, y in enumerate(labels) if y != -100)
        assert all(y == -100 for y in labels[:first]) and labels[first:] == ids[first:]
        assert tok.decode(labels[first:]) == " " + r["messages"][1]["content"] + "</s>"
        # What precedes them is exactly the generation prompt that inference renders.
        prompt = processor.apply_chat_template(tt.chat_messages(r, with_answer=False), add_generation_prompt=True,
                                               tokenize=False)
        assert processor(text=[prompt], images=tt.load_scene_images(r["images"]),
                         return_tensors="pt")["input_ids"][0].tolist() == ids[:first]


def test_micro_build_train_reload_generate(micro):
    root, data, init = micro
    config = json.loads((init / "config.json").read_text())
    assert config["model_type"] == "llava" and config["text_config"]["max_position_embeddings"] >= 1024
    out = root / "trained"
    metrics = tt.train_target(init, data, out, steps=12, batch_size=10, lr=3e-3, seed=0, log_every=1, bf16=False,
                              vision_warmup_steps=2, monitor_data=data, monitor_every=6, monitor_n=4,
                              monitor_describe=2)
    losses = [entry["loss"] for entry in metrics["losses"]]
    assert len(losses) == 12 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    assert len(metrics["vision_warmup"]) == 2 and [m["step"] for m in metrics["monitor"]] == [6, 12]
    # descriptions are graded beside the short answers (a stage can trade one for the other)
    assert {"describe", "overall"} <= set(metrics["monitor"][0]) and {"count", "colour"} & set(metrics["monitor"][0])
    picked = tt._monitor_records(data, 4, 2)
    assert [r["task"] for r in picked].count("describe") == 2 and len(picked) == 6
    assert all(r["task"] in ("count", "colour") for r in picked[:4])
    assert (out / "model.safetensors").is_file()

    model = AutoModelForImageTextToText.from_pretrained(str(out)).eval()
    processor = AutoProcessor.from_pretrained(str(out))
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert model.generation_config.eos_token_id == processor.tokenizer.eos_token_id
    assert model.generation_config.pad_token_id == processor.tokenizer.pad_token_id
    record = next(r for r in tt.load_records(data) if r["task"] == "compare")  # two images in one prompt
    prompt = processor.apply_chat_template(tt.chat_messages(record, with_answer=False), add_generation_prompt=True,
                                           tokenize=False)
    inputs = processor(text=[prompt], images=tt.load_scene_images(record["images"]), return_tensors="pt")
    with torch.no_grad():
        gen = model.generate(**inputs, do_sample=False, max_new_tokens=6)
    assert gen.shape[1] > inputs["input_ids"].shape[1]

    scores = tt.evaluate_target(out, data, n=6)
    assert set(scores) >= {"overall"} and all(0.0 <= v <= 1.0 for v in scores.values())


def test_scene_labels_mark_the_objects_cells_and_patches():
    scene = Scene((Obj("star", "red", "large", 0), Obj("circle", "blue", "small", 8, 1, -1)), "gray").to_dict()
    cells, patches = tt.cell_labels(scene), tt.patch_labels(scene, 6).view(6, 6, 3)
    star, circle = [1 + tt.SHAPES.index("star"), 1, 2], [1 + tt.SHAPES.index("circle"), 3, 1]
    assert cells[0].tolist() == star and cells[8].tolist() == circle and not cells[1:8].any()
    # Every patch of an occupied cell carries its object (cells are 2x2 patches on a 6x6 grid); the others none.
    assert (patches[:2, :2] == torch.tensor(star)).all() and (patches[4:, 4:] == torch.tensor(circle)).all()
    assert int((patches[..., 0] > 0).sum()) == 8
    assert tt.patch_cells(6).view(6, 6)[2:4, 2:4].eq(4).all() and tt.patch_cells(9).bincount().eq(9).all()


def test_answer_loss_weighs_every_answer_once():
    # Row 0 has one labelled token with loss ~ln(V); row 1 three tokens the logits already predict (loss ~0).
    v = 5
    logits = torch.zeros(2, 3, v)
    logits[1, torch.arange(3), torch.tensor([1, 2, 3])] = 50.0
    labels = torch.tensor([[-100, -100, 0], [1, 2, 3]])
    uniform = torch.log(torch.tensor(float(v)))
    assert torch.allclose(tt.answer_loss(logits, labels, per_example=True), uniform / 2)
    assert torch.allclose(tt.answer_loss(logits, labels, per_example=False), uniform / 4)
    # A row with no labelled token (a truncated answer) is left out rather than counted as zero loss.
    labels[0] = -100
    assert torch.allclose(tt.answer_loss(logits, labels, per_example=True), torch.tensor(0.0), atol=1e-6)


def test_vision_warmup_trains_the_tower_only(micro):
    _, data, init = micro
    model = AutoModelForImageTextToText.from_pretrained(str(init))
    processor = AutoProcessor.from_pretrained(str(init))
    records = tt.load_records(data)
    decoder = {k: v.clone() for k, v in model.model.language_model.state_dict().items()}
    tower = {k: v.clone() for k, v in model.model.vision_tower.state_dict().items()}
    probe = tt.VisionProbe(model.config.text_config.hidden_size, 4)
    log = tt.vision_warmup(model, tt.encode_set(processor, records, workers=1), probe, steps=8, batch_size=8, lr=3e-3,
                           g=torch.Generator().manual_seed(0), bf16=False, log_every=1)
    assert len(log) == 8 and log[-1]["loss"] < log[0]["loss"]
    assert all(torch.equal(v, model.model.language_model.state_dict()[k]) for k, v in decoder.items())
    assert any(not torch.equal(v, model.model.vision_tower.state_dict()[k]) for k, v in tower.items())
    text_only = [{**r, "images": [], "scene": None} for r in records]
    with pytest.raises(ValueError, match="single-image records"):
        tt.vision_warmup(model, tt.encode_set(processor, text_only, workers=1), probe, steps=1, batch_size=2, lr=1e-3,
                         g=torch.Generator().manual_seed(0), bf16=False, log_every=1)


def test_frozen_vision_tower_stays_put(micro, tmp_path):
    _, data, init = micro
    tt.train_target(init, data, tmp_path / "out", steps=3, batch_size=6, lr=3e-3, seed=0, bf16=False,
                    freeze_vision_tower=True)
    before = AutoModelForImageTextToText.from_pretrained(str(init)).state_dict()
    after = AutoModelForImageTextToText.from_pretrained(str(tmp_path / "out")).state_dict()
    tower = [k for k in before if ".vision_tower." in k or k.startswith("vision_tower.")]
    assert tower and all(torch.equal(before[k], after[k]) for k in tower)
    assert not all(torch.equal(before[k], after[k]) for k in before if "multi_modal_projector" in k)


def test_same_seed_same_weights(micro, tmp_path):
    root, data, _ = micro
    a = tt.build_target(root / "tok", tmp_path / "a", size="micro", seed=5)
    b = tt.build_target(root / "tok", tmp_path / "b", size="micro", seed=5)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()


def test_bad_arguments_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mmspec.data_tools.train_target", "--data-dir", str(tmp_path),
                           "--out", str(tmp_path / "o"), "--size", "huge"], capture_output=True, text=True)
    assert proc.returncode == 2 and "--size" in proc.stderr.strip().splitlines()[-1]
    with pytest.raises(ValueError):
        tt.build_target(tmp_path, tmp_path / "x", size="huge")
