"""Bad input gets a clear error naming the problem, from the library and from the CLI (exit 2, one line, no traceback)."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import mmspec
from mmspec import Drafter
from mmspec.images import load_images
from tiny_models import sample_images


@pytest.fixture(scope="module")
def pipe(tiny_dir):
    return mmspec.load(tiny_dir("llava"), "untrained", device="cpu")


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(temperature=-0.5), "temperature"),
        (dict(temperature="hot"), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=2), "top_p"),
        (dict(top_k=-1), "top_k"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(max_new_tokens=2.5), "max_new_tokens"),
    ],
)
def test_bad_generation_arguments(pipe, kwargs, match):
    with pytest.raises(ValueError, match=match):
        pipe.generate("hi", **kwargs)


def test_unreadable_and_truncated_images(tmp_path):
    missing = tmp_path / "nope.png"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_images([missing])
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image at all")
    with pytest.raises(ValueError, match="cannot read image"):
        load_images([junk])
    good = tmp_path / "good.png"
    sample_images(1)[0].resize((64, 64)).save(good)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ValueError, match="truncated|cannot read image"):
        load_images([truncated])
    with pytest.raises(ValueError, match="uint8"):
        load_images([np.zeros((8, 8, 3), dtype=np.float32)])
    with pytest.raises(TypeError, match="unsupported image type"):
        load_images([42])


def test_any_image_form_and_mode_works(pipe, tmp_path):
    im = sample_images(1)[0]
    path = tmp_path / "im.png"
    im.convert("P").save(path)
    forms = [im, str(path), np.asarray(im), im.convert("L"), im.convert("RGBA")]
    loaded = load_images(forms)
    assert all(x.mode == "RGB" and x.size == im.size for x in loaded)
    assert pipe.generate("what is it", [im, str(path)], max_new_tokens=3).stats.new_tokens == 3


def test_prompt_longer_than_context(pipe):
    ctx = pipe.runner.max_context
    with pytest.raises(ValueError, match="context"):
        pipe.generate("word " * (ctx + 10), max_new_tokens=2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        pipe.generate("hi", max_new_tokens=ctx)


def test_drafter_of_another_target(pipe, tiny_dir, tmp_path):
    other = mmspec.load(tiny_dir("qwen2_vl"), "untrained", device="cpu")
    other.drafter.save_pretrained(tmp_path / "d")
    with pytest.raises(ValueError, match="does not match the target.*model type"):
        mmspec.load(tiny_dir("llava"), tmp_path / "d", device="cpu")


def test_drafter_saved_only_as_pickle(pipe, tmp_path):
    d = tmp_path / "pickled"
    d.mkdir()
    torch.save(pipe.drafter.state_dict(), d / "pytorch_model.bin")
    with pytest.raises(ValueError, match="pickle"):
        Drafter.from_pretrained(d)


def test_drafter_round_trip(pipe, tmp_path):
    pipe.drafter.save_pretrained(tmp_path / "d")
    back = Drafter.from_pretrained(tmp_path / "d", target=pipe.target)
    for (k, a), (_, b) in zip(pipe.drafter.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), k
    assert back.config == pipe.drafter.config
    save_file({"bogus": torch.zeros(1)}, str(tmp_path / "d" / "model.safetensors"))
    with pytest.raises(ValueError, match="do not fit"):
        Drafter.from_pretrained(tmp_path / "d")


def test_unknown_target_and_missing_drafter(tiny_dir):
    with pytest.raises(FileNotFoundError, match="not a built-in name"):
        mmspec.load("no/such-model-anywhere", device="cpu")
    with pytest.raises(ValueError, match="no built-in drafter"):
        mmspec.load(tiny_dir("llava"), device="cpu")


def test_unknown_dtypes(tiny_dir):
    for kw in ({"dtype": "float64"}, {"dtype": torch.float64}, {"draft_dtype": "int8"}, {"draft_dtype": torch.int8}):
        with pytest.raises(ValueError, match=f"unknown {next(iter(kw))} .*use float32, bfloat16 or float16"):
            mmspec.load(tiny_dir("llava"), "untrained", device="cpu", **kw)


def test_text_only_target_refuses_images(tiny_dir):
    p = mmspec.load(tiny_dir("text_llm"), "untrained", device="cpu")
    with pytest.raises(ValueError, match="text-only"):
        p.generate("hi", images=sample_images(1), max_new_tokens=2)


def cli(*args):
    return subprocess.run([sys.executable, "-m", "mmspec", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(
    "args,match",
    [
        (["caption", "x.png", "--max-new-tokens", "0"], "positive integer"),
        (["caption", "x.png", "--temperature", "-1"], "number"),
        (["caption", "/no/such/image.png", "--target", "__T__", "--drafter", "untrained"], "does not exist"),
        (["caption", "--target", "no/such-model"], "IMAGE"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_cli_errors_exit_2_with_one_line(args, match, tiny_dir):
    args = [str(tiny_dir("llava")) if a == "__T__" else a for a in args]
    r = cli(*args)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert match in lines[0]


def test_cli_caption_compare_on_a_tiny_target(tiny_dir, tmp_path):
    img = tmp_path / "a.png"
    Image.fromarray(np.full((40, 40, 3), 120, dtype=np.uint8)).save(img)
    r = cli("caption", str(img), "--target", str(tiny_dir("llava")), "--drafter", "untrained", "--max-new-tokens", "12",
            "--compare")
    assert r.returncode == 0, r.stderr
    assert "outputs match: yes" in r.stdout
