"""Shapes-world generator and mini tokenizer: determinism, answers consistent with scenes, rendering, CLI errors."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from collections import Counter

import pytest
import torch
from PIL import Image

from mmspec.data_tools import shapes_world as sw
from mmspec.data_tools.tokenizer import CHAT_TEMPLATE, conversation_texts, train_tokenizer
from mmspec.data_tools.tokenizer import main as tok_main

NUMBERS = {w: i for i, w in enumerate(("zero", "one", "two", "three", "four", "five", "six", "seven", "eight"))}
POS_PHRASE = {p: i for i, p in enumerate(sw.POSITION_PHRASES)}


def _examples(task: str, n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        scenes = [sw.sample_scene(g) for _ in range(2 if task == "compare" else 1)]
        ex = sw.make_example(scenes if task == "compare" else scenes[0], task, g)
        yield scenes, ex["messages"][0]["content"], ex["messages"][1]["content"], ex


def _number(answer: str) -> int:
    first = re.sub(r"^there (is|are) ", "", answer.lower()).split()[0].strip(".")
    return int(first) if first.isdigit() else 0 if first == "no" else NUMBERS[first]


def _words(text: str, vocab) -> list[str]:
    return [w for w in vocab if re.search(rf"\b{w}\b", text.lower())]


def _position_phrase(text: str) -> int | None:
    hits = [p for p in sw.POSITION_PHRASES if p in text.lower()]
    return POS_PHRASE[max(hits, key=len)] if hits else None  # "at the top left" also contains "at the top"


def _positions(text: str) -> list[int]:
    """Cells named in an answer, in order ("top left and bottom" -> [0, 7])."""
    pattern = "|".join(sorted(sw.POSITIONS, key=len, reverse=True))
    return [sw.POSITIONS.index(m) for m in re.findall(rf"\b({pattern})\b", text.lower())]


# ------------------------------------------------------------------------------------------------------ determinism
def test_dataset_is_deterministic(tmp_path):
    a = sw.make_dataset(40, tmp_path / "a", seed=7)
    b = sw.make_dataset(40, tmp_path / "b", seed=7)
    c = sw.make_dataset(40, tmp_path / "c", seed=8)
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()
    rows = [json.loads(line) for line in a.read_text().splitlines()]
    assert len(rows) == 40
    for row in rows:
        assert set(row) >= {"images", "messages", "task", "scene"}
        assert [m["role"] for m in row["messages"]] == ["user", "assistant"]
        for rel in row["images"]:
            assert not rel.startswith("/")
            pa, pb = Image.open(a.parent / rel), Image.open(b.parent / rel)
            assert pa.tobytes() == pb.tobytes()
            assert (a.parent / rel).read_bytes() == (b.parent / rel).read_bytes()
    first_a = Image.open(a.parent / rows[0]["images"][0]).tobytes()
    first_c = Image.open(c.parent / json.loads(c.read_text().splitlines()[0])["images"][0]).tobytes()
    assert first_a != first_c


def test_scene_round_trips_through_dict():
    g = torch.Generator().manual_seed(1)
    for _ in range(50):
        scene = sw.sample_scene(g)
        assert sw.Scene.from_dict(json.loads(json.dumps(scene.to_dict()))) == scene
        assert sw.render(sw.Scene.from_dict(scene.to_dict())).tobytes() == sw.render(scene).tobytes()


# -------------------------------------------------------------------------------------------------------- rendering
def test_render_size_mode_and_distinct_colours():
    g = torch.Generator().manual_seed(2)
    counts, shapes, backgrounds = Counter(), Counter(), Counter()
    for _ in range(200):
        scene = sw.sample_scene(g)
        counts[len(scene.objects)] += 1
        shapes.update(o.shape for o in scene.objects)
        backgrounds[(scene.background, scene.style)] += 1
        img = sw.render(scene)
        assert img.size == (64, 64) and img.mode == "RGB"
        for o in scene.objects:
            x, y = sw.cell_centre(o)
            px = img.getpixel((int(x), int(y)))
            nearest = min(sw.COLOURS, key=lambda c: math.dist(sw.COLOURS[c], px))
            assert nearest == o.colour and math.dist(sw.COLOURS[o.colour], px) < 10, (o, px)
        for cell in set(range(9)) - {o.cell for o in scene.objects}:  # empty cells show only background
            px = img.getpixel((int((cell % 3 + 0.5) * 64 / 3), int((cell // 3 + 0.5) * 64 / 3)))
            assert min(math.dist(sw.COLOURS[o.colour], px) for o in scene.objects) > 60
    assert set(counts) == {1, 2, 3, 4} and set(shapes) == set(sw.SHAPES)
    assert len(backgrounds) > 12
    assert len(sw.SHAPES) >= 5 and len(sw.COLOURS) == 8 and len(sw.SIZES) == 2 and len(sw.POSITIONS) == 9


# ----------------------------------------------------------------------------------------- answers match the scene
def test_describe_lists_every_object_and_totals():
    for (scene,), _, answer, ex in _examples("describe", 300):
        objs = scene.objects
        assert _number(answer.split(".")[0].replace("The image shows", "").replace("I can see", "")) == len(objs)
        sentences = [s for s in re.split(r"(?<=\.) ", answer) if re.search(r"\b(small|large)\b", s)]
        assert len(sentences) == len(objs)
        for sentence, o in zip(sentences, objs):  # canonical order: by cell
            assert f"{o.size} {o.colour} {o.shape}" in sentence and _position_phrase(sentence) == o.cell
        totals = re.split(r"In total:|Altogether:|Summary:", answer)[1]
        for shape in sw.SHAPES:
            k = sum(o.shape == shape for o in objs)
            named = re.search(rf"\b(\w+) {shape if k == 1 else sw.PLURALS[shape]}\b", totals)
            assert (named is None) if k == 0 else NUMBERS[named.group(1)] == k
        assert len(answer.split()) >= 15
        assert sw.check_answer(ex, answer)


def test_count_answers():
    for (scene,), q, a, ex in _examples("count", 400):
        m_shape = re.match(r"How many (\w+) (are there|can you see)\?", q)
        colours = "|".join(sw.COLOURS)
        m_colour = re.search(rf"How many ({colours}) objects are there|How many objects are ({colours})\?", q)
        if m_shape and m_shape.group(1) != "objects" and m_colour is None:
            shape = next(s for s in sw.SHAPES if sw.PLURALS[s] == m_shape.group(1))
            expected = sum(o.shape == shape for o in scene.objects)
        elif m_colour:
            colour = m_colour.group(1) or m_colour.group(2)
            expected = sum(o.colour == colour for o in scene.objects)
        else:
            assert "objects" in q
            expected = len(scene.objects)
        assert _number(a) == expected, (q, a, scene)
        assert sw.check_answer(ex, a) and not sw.check_answer(ex, str(expected + 1))


def test_colour_and_shape_answers():
    for (scene,), q, a, ex in _examples("colour", 300):
        shape = _words(q, sw.SHAPES)[0]
        cell = _position_phrase(q)
        matches = [o for o in scene.objects if o.shape == shape and cell in (None, o.cell)]
        assert len(matches) == 1, (q, scene)  # only well-defined questions are asked
        assert _words(a, sw.COLOURS) == [matches[0].colour], (q, a)
        assert sw.check_answer(ex, a)
    for (scene,), q, a, ex in _examples("shape", 300, seed=1):
        colours, cell = _words(q, sw.COLOURS), _position_phrase(q)
        matches = [o for o in scene.objects if (colours and o.colour == colours[0]) or (not colours and o.cell == cell)]
        assert len(matches) == 1, (q, scene)
        assert _words(a, sw.SHAPES) == [matches[0].shape], (q, a)
        assert sw.check_answer(ex, a)


def test_position_answers():
    for (scene,), q, a, ex in _examples("position", 300):
        colour = _words(q, sw.COLOURS)[0]
        plural = [s for s in sw.SHAPES if re.search(rf"\b{sw.PLURALS[s]}\b", q)]
        shape = plural[0] if plural else _words(q, sw.SHAPES)[0]
        cells = [o.cell for o in scene.objects if (o.colour, o.shape) == (colour, shape)]
        assert (len(cells) > 1) == bool(plural) and cells
        assert _positions(a) == cells, (q, a)
        assert sw.check_answer(ex, a)


def test_yesno_answers_are_correct_and_balanced():
    yes = 0
    for (scene,), q, a, ex in _examples("yesno", 400):
        shape, cell, colours = _words(q, sw.SHAPES)[0], _position_phrase(q), _words(q, sw.COLOURS)
        if colours:
            truth = any((o.colour, o.shape) == (colours[0], shape) for o in scene.objects)
        else:
            truth = any((o.cell, o.shape) == (cell, shape) for o in scene.objects)
        assert a.lower().startswith("yes" if truth else "no"), (q, a, scene)
        assert sw.check_answer(ex, a) and not sw.check_answer(ex, "no" if truth else "yes")
        yes += truth
    assert 0.4 < yes / 400 < 0.6


def test_compare_answers():
    seen = Counter()
    for (s1, s2), q, a, ex in _examples("compare", 300):
        n1, n2 = len(s1.objects), len(s2.objects)
        assert len(ex["scene"]) == 2
        if "more objects" in q:
            expected = "same" if n1 == n2 else "first" if n1 > n2 else "second"
            assert (expected in a.lower()) or (expected == "same" and "neither" in a.lower()), (q, a)
        elif "both images" in q:
            shape = _words(q, sw.SHAPES)[0]
            both = all(any(o.shape == shape for o in s.objects) for s in (s1, s2))
            assert a.lower().startswith("yes" if both else "no"), (q, a)
        else:
            assert _number(a) == n1 + n2
        seen[ex["answer"]] += 1
        assert sw.check_answer(ex, a)
    assert {"first", "second", "yes", "no"} <= set(seen)


def test_templates_vary_and_bad_inputs_raise():
    phrasings = {t: {(q, a.split(" ")[0]) for _, q, a, _ in _examples(t, 60)} for t in sw.TASKS}
    assert all(len({q for q, _ in v}) >= 3 and len({a for _, a in v}) >= 2 for v in phrasings.values())
    g = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError):
        sw.make_example(sw.sample_scene(g), "paint", g)
    with pytest.raises(ValueError):
        sw.Scene((sw.Obj("circle", "red", "small", 0), sw.Obj("star", "blue", "large", 0)), "gray")


# -------------------------------------------------------------------------------------------------------------- CLI
def _cli(*args):
    return subprocess.run([sys.executable, "-m", "mmspec.data_tools.shapes_world", *args],
                          capture_output=True, text=True, timeout=60)


def test_cli_bad_arguments_exit_2(tmp_path, capsys):
    r = _cli("--n", "0", "--out", str(tmp_path / "d"))  # the real entry point, once (each start imports mmspec)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and "error: --n must be positive" in r.stderr.strip().splitlines()[-1]
    for args in (["--n", "3", "--tasks", "count,paint"], ["--n", "x"], ["--n", "2", "--split-name", "../up"]):
        with pytest.raises(SystemExit) as exc:
            sw.main([*args, "--out", str(tmp_path / "d")])
        assert exc.value.code == 2 and "error:" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_cli_writes_split(tmp_path):
    r = _cli("--n", "6", "--out", str(tmp_path), "--seed", "3", "--tasks", "describe,compare", "--split-name", "val")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in (tmp_path / "val.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and {r["task"] for r in rows} <= {"describe", "compare"}
    assert all((tmp_path / p).is_file() for r in rows for p in r["images"])
    assert rows == [json.loads(line) for line in sw.make_dataset(6, tmp_path / "api", 3, ["describe", "compare"],
                                                                 "val").read_text().splitlines()]


# -------------------------------------------------------------------------------------------------------- tokenizer
@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    data = sw.make_dataset(300, root / "data", seed=0)
    train_tokenizer(conversation_texts(data), root / "tok", vocab_size=768)
    return root


def test_tokenizer_round_trips_and_renders_chat_template(tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir / "tok")
    assert len(tok) <= 768 and tok.image_token == "<image>"
    assert [tok.convert_tokens_to_ids(t) for t in ("<unk>", "<s>", "</s>", "<pad>", "<image>")] == [0, 1, 2, 3, 4]
    assert tok.chat_template == CHAT_TEMPLATE
    row = json.loads((tokenizer_dir / "data" / "train.jsonl").read_text().splitlines()[0])
    (_, desc, _), = [(s, a, e) for (s,), _, a, e in _examples("describe", 1, seed=5)]
    for text in (desc, row["messages"][1]["content"], "Ünïcode and 😀 never become unknown"):
        ids = tok(text, add_special_tokens=True)["input_ids"]
        assert tok.decode(ids) == text and tok.unk_token_id not in ids
    assert len(tok(desc)["input_ids"]) < len(desc) / 3  # words of the corpus are single tokens

    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the star?"}]},
            {"role": "assistant", "content": "It is red."}]
    full = tok.apply_chat_template(msgs, tokenize=False)
    # The question comes before the image whatever the order of the parts (the decoder reads better that way).
    assert full == "<s>USER: What colour is the star?\n<image> ASSISTANT: It is red.</s>"
    prompt = tok.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == "<s>USER: What colour is the star?\n<image> ASSISTANT:"
    two = [{"role": "user", "content": [{"type": "text", "text": "Same?"}, {"type": "image"}, {"type": "image"}]}]
    assert tok.apply_chat_template(two, tokenize=False) == "<s>USER: Same?\n<image>\n<image> "
    assert tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False) == "<s>USER: Hi "
    enc = tok.apply_chat_template(msgs, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = enc["input_ids"], enc["assistant_masks"]
    prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    assert ids[: len(prompt_ids)] == prompt_ids and ids.count(tok.convert_tokens_to_ids("<image>")) == 1
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == " It is red.</s>" and ids[-1] == tok.eos_token_id


def test_tokenizer_cli(tokenizer_dir, tmp_path, capsys):
    data = str(tokenizer_dir / "data" / "train.jsonl")
    tok_main(["--data", data, "--out", str(tmp_path / "t"), "--vocab-size", "600"])
    assert (tmp_path / "t" / "tokenizer.json").is_file() and (tmp_path / "t" / "chat_template.jinja").is_file()
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    missing = str(tmp_path / "missing.jsonl")
    for args in (["--data", missing], ["--data", str(bad)], ["--data", data, "--vocab-size", "9"]):
        with pytest.raises(SystemExit) as exc:
            tok_main([*args, "--out", str(tmp_path / "u")])
        assert exc.value.code == 2 and "error:" in capsys.readouterr().err
    assert not (tmp_path / "u").exists()
