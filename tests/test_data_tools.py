"""data_tools: the JSONL reader/writer, target regeneration (ViSpec recipe) and the LLaVA / ShareGPT converters."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from mmspec.adapters import adapter_for
from mmspec.errors import InputError, MissingInputError
from mmspec.data_tools.convert import convert, strip_placeholders
from mmspec.data_tools.jsonl import (
    EMPTY_ASSISTANT, MISSING_IMAGE, NO_ASSISTANT, read_conversations, write_jsonl,
)
from mmspec.data_tools.regenerate import regenerate
from tiny_models import sample_images

N_NEW = 6
SUFFIX = " Please answer in detail."


def _write(path: Path, lines: list) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines), encoding="utf-8")
    return path


def _turns(*texts: str) -> list[dict]:
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(texts)]


@pytest.fixture(autouse=True)
def one_thread():
    """The tiny models are far faster on one thread, and the machine is shared: restore the setting afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def pngs(tmp_path):
    names = []
    for i, im in enumerate(sample_images(3, seed=1)):
        im.save(tmp_path / f"im{i}.png")
        names.append(f"im{i}.png")
    return names


# ---- reader / writer ---------------------------------------------------------------------------------------------
GOOD = {"images": [], "messages": _turns("hi", "hello")}


@pytest.mark.parametrize(
    "bad, needle",
    [
        ('{"images": [], "messages": [', "not valid JSON"),
        ({"images": []}, "missing key 'messages'"),
        ({"messages": [{"role": "user", "content": 3}]}, "content must be a string"),
        ({"messages": [{"role": "user"}]}, "missing key 'content'"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "role 'robot'"),
        ({"messages": _turns("hi", "x")[1:]}, "must start with a user turn"),
        ({"images": "a.png", "messages": _turns("hi", "x")}, "'images' must be a list"),
        ([1, 2], "expected a JSON object"),
    ],
)
def test_reader_errors_name_file_and_line(tmp_path, bad, needle):
    path = _write(tmp_path / "data.jsonl", [GOOD, "", bad, GOOD])  # the blank line still counts: bad is line 3
    with pytest.raises(ValueError, match=r"data\.jsonl:3: .*" + needle.replace("(", r"\(")):
        read_conversations(path)


def test_reader_skips_and_counts(tmp_path, pngs, caplog):
    sub = tmp_path / "sub"
    sub.mkdir()
    lines = [
        {"images": ["../im0.png"], "messages": _turns("q0", "a0"), "id": 7},  # relative to the file's directory
        {"images": ["nope.png"], "messages": _turns("q1", "a1")},
        {"images": [], "messages": _turns("q2", "  ")},
        {"images": [], "messages": _turns("q3", "a3", "q3b", "")},
        {"images": [], "messages": _turns("q4")},
        {"images": ["gone.png", "../im1.png"], "messages": _turns("q5", "a5")},
        {"messages": [{"role": "system", "content": "be brief"}] + _turns("q6", "a6")},
    ]
    path = _write(sub / "data.jsonl", lines)
    with caplog.at_level(logging.WARNING, logger="mmspec.data_tools.jsonl"):
        convs, report = read_conversations(path)
    assert [c.line_no for c in convs] == [1, 7]
    assert convs[0].images[0].resolve() == (tmp_path / "im0.png").resolve()
    assert convs[0].extra == {"id": 7} and convs[1].images == ()
    assert report.counts == {MISSING_IMAGE: 2, EMPTY_ASSISTANT: 2, NO_ASSISTANT: 1}
    assert report.first_lines[MISSING_IMAGE] == [2, 6] and report.kept == 2
    assert "skipped 5" in caplog.text and MISSING_IMAGE in caplog.text

    # question-only and unchecked-image reading (what regenerate uses)
    convs, report = read_conversations(path, check_images=False, require_answers=False)
    assert len(convs) == 7 and report.total == 0


def test_record_keeps_paths_valid_from_another_directory(tmp_path, pngs):
    path = _write(tmp_path / "data.jsonl", [{"images": ["im0.png"], "messages": _turns("q", "a"), "k": 1}])
    (conv,), _ = read_conversations(path)
    assert conv.record(out_dir=tmp_path) == {"images": ["im0.png"], "messages": _turns("q", "a"), "k": 1}
    (tmp_path / "out").mkdir()
    moved = conv.record(out_dir=tmp_path / "out")
    assert moved["images"] == [str(Path("..") / "im0.png")]


def test_write_jsonl_is_atomic(tmp_path):
    path = tmp_path / "x.jsonl"
    assert write_jsonl(path, [{"a": 1}, {"b": "ü"}]) == 2
    assert path.read_text(encoding="utf-8") == '{"a": 1}\n{"b": "ü"}\n'

    def broken():
        yield {"c": 1}
        raise RuntimeError("crash mid-write")

    with pytest.raises(RuntimeError):
        write_jsonl(path, broken())
    assert path.read_text(encoding="utf-8") == '{"a": 1}\n{"b": "ü"}\n'  # the old file, untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.jsonl"]  # no temporary left behind


# ---- regenerate --------------------------------------------------------------------------------------------------
def _regen_data(tmp_path: Path, pngs: list[str]) -> Path:
    return _write(tmp_path / "in.jsonl", [
        {"images": [pngs[0]], "messages": _turns("what is in the picture", "a cat"), "id": "a"},
        {"images": [pngs[1]], "messages": _turns("describe it", "x", "and the colour", "y"), "id": "b"},
        {"images": [], "messages": _turns("tell me a story", "once")},
        {"images": [pngs[1], pngs[2]], "messages": _turns("compare the two images")},  # question only: answer added
        {"images": [pngs[2]], "messages": [{"role": "system", "content": "be brief"}] + _turns("count", "")},
    ])


def _direct(model, processor, adapter, messages, images) -> str:
    """The target's own greedy answer, computed without data_tools."""
    inputs = adapter.prepare(processor, messages, images)
    out = model.generate(**inputs, do_sample=False, max_new_tokens=N_NEW)
    return processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def _user(text: str, images=()) -> dict:
    return {"role": "user", "content": [{"type": "image"} for _ in images] + [{"type": "text", "text": text + SUFFIX}]}


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_regenerate_is_the_targets_own_greedy_answer(tmp_path, tiny_dir, pngs, family):
    target = tiny_dir(family)
    data = _regen_data(tmp_path, pngs)
    out1, out3 = tmp_path / "b1.jsonl", tmp_path / "b3.jsonl"
    assert regenerate(target, data, out1, prompt_suffix=SUFFIX, max_new_tokens=N_NEW, batch_size=1) == 5
    assert regenerate(target, data, out3, prompt_suffix=SUFFIX, max_new_tokens=N_NEW, batch_size=3) == 5
    assert out1.read_bytes() == out3.read_bytes()  # left-padded batches change nothing (mixed 0/1/2 images)

    recs = [json.loads(x) for x in out1.read_text(encoding="utf-8").splitlines()]
    src = [json.loads(x) for x in data.read_text(encoding="utf-8").splitlines()]
    for r, s in zip(recs, src):  # original user text, images and extra keys kept; only answers change
        assert r["images"] == s["images"] and r.get("id") == s.get("id")
        asked = [m for m in r["messages"] if m["role"] != "assistant"]
        assert asked == [m for m in s["messages"] if m["role"] != "assistant"]
    assert [m["role"] for m in recs[3]["messages"]] == ["user", "assistant"]

    model = AutoModelForImageTextToText.from_pretrained(target, dtype=torch.float32, local_files_only=True).eval()
    processor = AutoProcessor.from_pretrained(target, local_files_only=True)
    adapter = adapter_for(model.config)
    ims = [sample_images(3, seed=1)[i].copy() for i in range(3)]
    with torch.inference_mode():
        a0 = _direct(model, processor, adapter, [_user("what is in the picture", ims[:1])], ims[:1])
        assert recs[0]["messages"][1]["content"] == a0 and a0 != "a cat"
        # multi-turn: turn 2 is answered given the regenerated turn 1
        hist = [_user("describe it", ims[1:2])]
        b1 = _direct(model, processor, adapter, hist, ims[1:2])
        hist += [{"role": "assistant", "content": [{"type": "text", "text": b1}]}, _user("and the colour")]
        b2 = _direct(model, processor, adapter, hist, ims[1:2])
        assert [m["content"] for m in recs[1]["messages"][1::2]] == [b1, b2]
        c = _direct(model, processor, adapter, [_user("compare the two images", ims[1:3])], ims[1:3])
        assert recs[3]["messages"][1]["content"] == c


def test_regenerate_resumes_a_truncated_output(tmp_path, tiny_dir, pngs):
    target = tiny_dir("llava")
    data = _regen_data(tmp_path, pngs)
    full = tmp_path / "full.jsonl"
    regenerate(target, data, full, max_new_tokens=N_NEW, batch_size=2)
    lines = full.read_bytes().splitlines(keepends=True)
    part = tmp_path / "part.jsonl"
    part.write_bytes(b"".join(lines[:2]) + lines[2][: len(lines[2]) // 2])  # a crash in the middle of line 3
    assert regenerate(target, data, part, max_new_tokens=N_NEW, batch_size=2) == 3
    assert part.read_bytes() == full.read_bytes()
    assert regenerate(target, data, part, max_new_tokens=N_NEW, batch_size=2) == 0  # complete: nothing to do

    other = _write(tmp_path / "other.jsonl", [{"messages": _turns("a different question", "x")}])
    with pytest.raises(ValueError, match="part.jsonl:1: .*not made from this input"):
        regenerate(target, other, part, max_new_tokens=N_NEW)


def test_regenerate_two_processes_write_one_file_in_order(tmp_path, tiny_dir, pngs):
    target = tiny_dir("qwen2_vl")
    data = _regen_data(tmp_path, pngs)
    single = tmp_path / "single.jsonl"
    regenerate(target, data, single, max_new_tokens=N_NEW, batch_size=1)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "mmspec.data_tools.regenerate", "--target", str(target), "--data", str(data),
           "--out", str(tmp_path / "dp.jsonl"), "--max-new-tokens", str(N_NEW), "--batch-size", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    assert (tmp_path / "dp.jsonl").read_bytes() == single.read_bytes()


def test_regenerate_cli_bad_input_exits_2(tmp_path):
    cmd = [sys.executable, "-m", "mmspec.data_tools.regenerate", "--target", str(tmp_path), "--data",
           str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o.jsonl")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 2
    assert "missing.jsonl" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert "Traceback" not in res.stderr


def test_unreadable_files_are_user_errors_naming_them(tmp_path, tiny_dir):
    """A directory, a missing file or non-UTF-8 bytes where a data file should be: a UserError naming the file (the
    CLIs' one-line exit 2), never a raw OSError or UnicodeDecodeError."""
    with pytest.raises(InputError, match=f"cannot read data file '{tmp_path}'"):
        read_conversations(tmp_path)
    with pytest.raises(MissingInputError, match="missing.jsonl' does not exist"):
        read_conversations(tmp_path / "missing.jsonl")
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(json.dumps({"messages": _turns("caf\u00e9", "x")}, ensure_ascii=False).encode("latin-1") + b"\n")
    with pytest.raises(InputError, match=r"latin.jsonl:1: not UTF-8"):
        read_conversations(latin)
    with pytest.raises(InputError, match="cannot read input"):
        convert(tmp_path, "llava", tmp_path / "o.jsonl")
    data = _write(tmp_path / "q.jsonl", [{"messages": _turns("hi")}])
    (tmp_path / "out_dir").mkdir()
    with pytest.raises(InputError, match="cannot read --out .*out_dir"):
        regenerate(tiny_dir("llava"), data, tmp_path / "out_dir", max_new_tokens=N_NEW)
    res = subprocess.run([sys.executable, "-m", "mmspec.data_tools.convert", "--from", "llava", str(tmp_path), "--out",
                          str(tmp_path / "o.jsonl")], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr
    assert str(tmp_path) in res.stderr


# ---- converters --------------------------------------------------------------------------------------------------
def test_strip_placeholders():
    assert strip_placeholders("<image>\nWhat is it?") == ("What is it?", 1)
    assert strip_placeholders("What is it?\n<image>") == ("What is it?", 1)
    assert strip_placeholders("Compare <image> and <image>.") == ("Compare and .", 2)
    assert strip_placeholders("  keep  my spacing ") == ("  keep  my spacing ", 0)


def test_convert_llava(tmp_path, pngs, caplog):
    src = tmp_path / "llava.json"
    src.write_text(json.dumps([
        {"id": "0", "image": "im0.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat is shown?"}, {"from": "gpt", "value": "A shape."},
            {"from": "human", "value": "Colour?"}, {"from": "gpt", "value": "Red."}]},
        {"id": "1", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
        {"id": "2", "image": "im1.png", "conversations": [{"from": "robot", "value": "x"}]},
        {"id": "3", "conversations": [{"from": "gpt", "value": "I start"}, {"from": "human", "value": "no"}]},
        {"id": "4", "conversations": [{"from": "human", "value": "<image>\nWhere is the image?"}]},
    ]))
    out = tmp_path / "out" / "train.jsonl"
    with caplog.at_level(logging.WARNING):
        n, report = convert(src, "llava", out)
    assert n == 2 and report.total == 3 and report.first_lines["unknown role"] == [2]
    assert "unknown role" in caplog.text
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    assert recs[0] == {"images": [str(Path("..") / "im0.png")], "id": "0", "messages": [
        {"role": "user", "content": "What is shown?"}, {"role": "assistant", "content": "A shape."},
        {"role": "user", "content": "Colour?"}, {"role": "assistant", "content": "Red."}]}
    assert recs[1]["images"] == [] and recs[1]["messages"][0] == {"role": "user", "content": "Hi"}
    convs, skipped = read_conversations(out)  # the shared reader accepts the output, images resolve
    assert len(convs) == 2 and skipped.total == 0 and convs[0].images[0].resolve() == (tmp_path / "im0.png").resolve()

    with pytest.raises(ValueError, match=r"entry 2: unknown role"):
        convert(src, "llava", tmp_path / "strict.jsonl", strict=True)
    n, _ = convert(src, "llava", tmp_path / "rooted.jsonl", image_root=tmp_path / "coco")
    assert json.loads((tmp_path / "rooted.jsonl").read_text().splitlines()[0])["images"] == [str(Path("coco/im0.png"))]


def test_convert_sharegpt(tmp_path, pngs):
    src = tmp_path / "sg.jsonl"  # JSONL input is accepted too
    _write(src, [
        {"conversations": [{"from": "system", "value": "Be kind."}, {"from": "user", "value": "Hi"},
                           {"from": "assistant", "value": "Hello"}]},
        {"messages": [{"role": "user", "content": "<image><image>Compare"}, {"role": "assistant", "content": "Same"}],
         "images": ["im0.png", "im1.png"], "source": "x"},
        {"messages": [{"role": "tool", "content": "{}"}]},
        {"conversations": [{"from": "human", "value": 5}]},
    ])
    out = tmp_path / "sg_out.jsonl"
    n, report = convert(src, "sharegpt", out)
    assert n == 2 and report.counts == {"unknown role": 1, "non-string text": 1}
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    assert recs[0]["messages"] == [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"},
                                   {"role": "assistant", "content": "Hello"}]
    assert recs[1] == {"images": ["im0.png", "im1.png"], "source": "x",
                       "messages": [{"role": "user", "content": "Compare"}, {"role": "assistant", "content": "Same"}]}
