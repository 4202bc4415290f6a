"""The mini-vlm build path on a micro model: build, train a few steps, save, reload through the Auto classes, generate."""

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from mmspec.data_tools import train_target as tt
from mmspec.data_tools.shapes_world import TASKS, make_dataset
from mmspec.data_tools.tokenizer import conversation_texts, train_tokenizer


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    root = tmp_path_factory.mktemp("micro_target")
    data = make_dataset(30, root / "data", seed=3, tasks=TASKS)
    train_tokenizer(conversation_texts(data), root / "tok")
    init = tt.build_target(root / "tok", root / "init", size="micro", seed=0)
    return root, data, init


def test_labels_cover_exactly_the_assistant_tokens(micro):
    _, data, init = micro
    processor = AutoProcessor.from_pretrained(str(init))
    tok = processor.tokenizer
    records = tt.load_records(data)
    assert {r["task"] for r in records} >= {"describe", "compare"}
    for r in records:
        ids, labels = tt.encode_example(processor, r)
        text = processor.apply_chat_template(tt.chat_messages(r), tokenize=False)
        reference = processor(text=[text], images=tt._load_images(r["images"]), return_tensors="pt")
        # The ids are those the processor itself produces (image tokens expanded), for one and for two images.
        assert ids == reference["input_ids"][0].tolist()
        assert ids.count(tok.convert_tokens_to_ids("<image>")) == len(r["images"]) * tt._num_image_tokens(processor)
        # The labelled tokens are one contiguous run at the end: " answer</s>".
        first = next(i for i, y in enumerate(labels) if y != -100)
        assert all(y == -100 for y in labels[:first]) and labels[first:] == ids[first:]
        assert tok.decode(labels[first:]) == " " + r["messages"][1]["content"] + "</s>"
        # What precedes them is exactly the generation prompt that inference renders.
        prompt = processor.apply_chat_template(tt.chat_messages(r, with_answer=False), add_generation_prompt=True,
                                               tokenize=False)
        assert processor(text=[prompt], images=tt._load_images(r["images"]),
                         return_tensors="pt")["input_ids"][0].tolist() == ids[:first]


def test_micro_build_train_reload_generate(micro):
    root, data, init = micro
    config = json.loads((init / "config.json").read_text())
    assert config["model_type"] == "llava" and config["text_config"]["max_position_embeddings"] >= 1024
    out = root / "trained"
    metrics = tt.train_target(init, data, out, steps=12, batch_size=10, lr=3e-3, seed=0, log_every=1, bf16=False)
    losses = [entry["loss"] for entry in metrics["losses"]]
    assert len(losses) == 12 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    assert (out / "model.safetensors").is_file()

    model = AutoModelForImageTextToText.from_pretrained(str(out)).eval()
    processor = AutoProcessor.from_pretrained(str(out))
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert model.generation_config.eos_token_id == processor.tokenizer.eos_token_id
    assert model.generation_config.pad_token_id == processor.tokenizer.pad_token_id
    record = next(r for r in tt.load_records(data) if r["task"] == "compare")  # two images in one prompt
    prompt = processor.apply_chat_template(tt.chat_messages(record, with_answer=False), add_generation_prompt=True,
                                           tokenize=False)
    inputs = processor(text=[prompt], images=tt._load_images(record["images"]), return_tensors="pt")
    with torch.no_grad():
        gen = model.generate(**inputs, do_sample=False, max_new_tokens=6)
    assert gen.shape[1] > inputs["input_ids"].shape[1]

    scores = tt.evaluate_target(out, data, n=6)
    assert set(scores) >= {"overall"} and all(0.0 <= v <= 1.0 for v in scores.values())


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
