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
from mmspec.errors import InputError
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
    weights = tmp_path / "d" / "model.safetensors"
    whole = weights.read_bytes()
    weights.write_bytes(whole[: len(whole) // 2])  # an interrupted copy
    with pytest.raises(InputError, match=r"'.*/d/model\.safetensors' is not a complete safetensors file.*truncated"):
        Drafter.from_pretrained(tmp_path / "d")
    save_file({"bogus": torch.zeros(1)}, str(weights))
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
        (["caption", "__TMP__", "--target", "__T__", "--drafter", "untrained"], "is a directory"),
        (["train-drafter", "--target", "__T__", "--data", "__TMP__", "--out", "__TMP__/o"], "cannot read data file"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_cli_errors_exit_2_with_one_line(args, match, tiny_dir, tmp_path):
    args = [a.replace("__T__", str(tiny_dir("llava"))).replace("__TMP__", str(tmp_path)) for a in args]
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


def test_cli_keeps_the_traceback_of_an_internal_error(tmp_path):
    """Only UserError becomes the one-line exit 2: a TypeError from a bug inside a command keeps its traceback."""
    code = ("import sys, mmspec.export\n"
            "def broken(*a, **k):\n"
            "    raise TypeError('an internal bug')\n"
            "mmspec.export.export_eagle3 = broken\n"
            "from mmspec.cli import main\n"
            "sys.exit(main(sys.argv[1:]))\n")
    r = subprocess.run([sys.executable, "-c", code, "export-drafter", str(tmp_path), "--format", "eagle3", "--out",
                        str(tmp_path / "o")], capture_output=True, text=True, timeout=300)
    assert r.returncode not in (0, 2), r.stderr
    assert "Traceback" in r.stderr and "TypeError: an internal bug" in r.stderr, r.stderr
    assert "mmspec export-drafter: error" not in r.stderr


def test_cli_export_of_a_truncated_drafter_names_the_file(pipe, tmp_path):
    pipe.drafter.save_pretrained(tmp_path / "d")
    weights = tmp_path / "d" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    r = cli("export-drafter", str(tmp_path / "d"), "--format", "eagle3", "--out", str(tmp_path / "o"))
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert str(weights) in lines[0] and "truncated" in lines[0]


def test_caption_compare_warms_up_both_methods_and_alternates(tmp_path, monkeypatch, capsys):
    """--compare times neither method cold: both get a short warm-up run first, then the timed runs alternate (and so
    does which goes first), and each method's best run is reported."""
    from types import SimpleNamespace

    import mmspec.cli

    calls = []

    class FakePipe:
        tree = mmspec.TreeConfig.preset("cpu")

        def generate(self, prompt, images, *, max_new_tokens, speculative=True, **kw):
            calls.append((speculative, max_new_tokens))
            n = len([c for c in calls if c[0] == speculative])
            speed = (300.0 if speculative else 100.0) + n  # later runs a little faster, like a warming machine
            stats = SimpleNamespace(new_tokens=max_new_tokens, tokens_per_s=speed, mean_accepted=3.0 if speculative else 1.0)
            return SimpleNamespace(text="a red circle", token_ids=[1, 2, 3], stats=stats)

    monkeypatch.setattr(mmspec, "load", lambda *a, **k: FakePipe())
    img = tmp_path / "a.png"
    Image.fromarray(np.full((8, 8, 3), 9, dtype=np.uint8)).save(img)
    assert mmspec.cli.main(["caption", str(img), "--max-new-tokens", "20", "--compare", "--device", "cpu"]) == 0
    warm, timed = calls[:2], calls[2:]
    assert sorted(warm) == [(False, 4), (True, 4)]  # one short warm-up of each method before any timed run
    rounds = mmspec.cli.COMPARE_ROUNDS
    assert len(timed) == 2 * rounds and all(n == 20 for _, n in timed)
    assert [s for s, _ in timed] == [True, False, False, True, True, False][: 2 * rounds]  # alternating, order too
    out = capsys.readouterr().out
    assert "outputs match: yes" in out and f"speedup {(300 + rounds + 1) / (100 + rounds + 1):.2f}x" in out
