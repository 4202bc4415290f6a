"""The ViSpec adaptor (shapes, positions, identity init) and drafter training (unroll = inference, loss falls, resume,
torchrun data parallel, lossless with a trained drafter)."""

import json
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file, save_file

import mmspec
from mmspec import Drafter
from mmspec.drafter import DraftKV
from mmspec.errors import InputError
from mmspec.proposer import PromptContext, build_pairs, prompt_pairs
from mmspec.train import TrainConfig, train_drafter
from mmspec.train_examples import teach
from mmspec.train_objective import DraftObjective
from mmspec.vision import plan_compression
from tiny_models import sample_images

PROMPT = "Describe the picture."


@pytest.fixture(scope="module")
def pipes(tiny_dir):
    cache = {}

    def get(family):
        if family not in cache:
            # fp32 drafters: these tests hold drafting to training's fp32 arithmetic at tight tolerances
            cache[family] = mmspec.load(tiny_dir(family), "untrained", device="cpu", draft_dtype="float32")
        return cache[family]

    return get


def prompt_context(pipe, images):
    inputs = pipe.prepare(PROMPT, images)
    pre = pipe.runner.prefill(inputs, True, True)
    pos, next_pos = pipe.adapter.prompt_positions(pipe.target, inputs)
    ctx = PromptContext(inputs["input_ids"][0], pos, pre.hidden_states, pre.input_embeds[0],
                        pipe.adapter.count_images(inputs))
    return inputs, ctx, next_pos


def test_plan_compression_table():
    img = 9
    ids = torch.tensor([1, 2, img, img, img, img, 3, img, img, img, 4, 5])
    plan = plan_compression(ids, img, num_queries=3)  # 2 slots per image
    assert plan.spans == ((2, 6), (7, 10))
    assert plan.keep.tolist() == [1, 4, 5, 6, 8, 9, 10, 11]
    assert plan.slot.tolist() == [-1, 0, 1, -1, 2, 3, -1, -1]
    assert plan.image_of.tolist() == [-1, -1, -1, 0, 0, 0, 1, 1]


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
@pytest.mark.parametrize("n_images", [0, 1, 2])
def test_adaptor_compresses_images_at_their_last_positions(pipes, family, n_images):
    pipe = pipes(family)
    d = pipe.drafter
    assert d.vision is not None and d.vision.num_queries == 2
    inputs, ctx, next_pos = prompt_context(pipe, sample_images(n_images, seed=3))
    ids = ctx.input_ids
    img_id = d.config.image_token_id
    n_img_tokens = int((ids == img_id).sum())
    pairs, last_vec = prompt_pairs(d, ctx, first_token=5, first_pos=next_pos)
    # every image's N tokens became num_queries - 1 = 1 slot; text keeps every token (minus t_0)
    assert pairs.tokens.numel() == ids.numel() - n_img_tokens + n_images
    text_positions = ctx.positions[ids != img_id][1:].tolist() + [next_pos]
    got_text = pairs.positions[pairs.tokens != img_id].tolist()
    assert got_text == text_positions  # text keeps the target's own positions (M-RoPE offsets included)
    ends = [e for _, e in plan_compression(ids, img_id, 2, n_images).spans]
    assert len(ends) == n_images
    assert pairs.positions[pairs.tokens == img_id].tolist() == [int(ctx.positions[e - 1]) for e in ends]
    assert (last_vec is None) == (n_images == 0)
    if n_images:  # text after the last image carries its global vector; text before any image carries zeros
        assert torch.equal(pairs.image_vec[-1], last_vec[0])
        assert not pairs.image_vec[0].any()


def test_untrained_adaptor_equals_text_only_drafter(pipes):
    pipe = pipes("llava")
    with_adaptor = pipe.drafter
    plain = Drafter.for_target(pipe.target, vision_adaptor=False)
    plain.load_state_dict({k: v for k, v in with_adaptor.state_dict().items() if not k.startswith(("vision", "inject"))})
    _, ctx, next_pos = prompt_context(pipe, [])
    outs = []
    for d in (with_adaptor, plain):
        pairs, vec = prompt_pairs(d, ctx, 5, next_pos)
        emb = None if pairs.embeds is None else pairs.embeds[None]
        vec = None if pairs.image_vec is None else pairs.image_vec[None]
        h = d(pairs.tokens[None], pairs.features[None], pairs.positions[None], None, None, emb, vec)
        outs.append(d.logits(h))
    assert torch.allclose(outs[0], outs[1], atol=1e-5)
    f, g = torch.randn(3, 64), torch.randn(3, 64)
    assert torch.allclose(with_adaptor.inject(torch.cat([f, g], -1)), f, atol=1e-6)  # [I | 0]


def test_bf16_drafter_keeps_exact_rotary_angles(pipes):
    """A drafter cast to bfloat16 (the default beside an fp32 target on a CPU with native bf16) rotates q and k by
    fp32 angles: in bf16, position 700 times a frequency would be off by radians, not by bf16's rounding."""
    d32 = Drafter.for_target(pipes("llava").target, vision_adaptor=False).eval()
    d16 = Drafter.for_target(pipes("llava").target, vision_adaptor=False)
    d16.load_state_dict(d32.state_dict())
    d16.to(torch.bfloat16)
    x = torch.randn(1, 4, 2 * d32.config.hidden_size, generator=torch.Generator().manual_seed(0))
    pos = torch.arange(700, 704)[None]
    for a, b in zip(d32.qkv(x, pos)[:2], d16.qkv(x.bfloat16(), pos)[:2]):
        assert b.dtype == torch.bfloat16
        assert ((b.float() - a).norm() / a.norm()).item() < 0.02


def test_a_drafter_instance_keeps_the_targets_dtype(pipes, tiny_dir):
    """Only drafters mmspec loads itself get the CPU's bf16 default: one the caller holds is not recast behind its back."""
    d = Drafter.for_target(pipes("llava").target, vision_adaptor=False)
    pipe = mmspec.load(tiny_dir("llava"), d, device="cpu")
    assert pipe.drafter is d and d.q_proj.weight.dtype == torch.float32
    assert mmspec.load(tiny_dir("llava"), d, device="cpu", draft_dtype="bfloat16").drafter.q_proj.weight.dtype \
        == torch.bfloat16


def test_training_unroll_equals_inference_drafting(pipes):
    """Layer 4: the unrolled training attention is exactly what the proposer's KV cache gives at draft depth 2 and 3."""
    pipe = pipes("llava")
    d = pipe.drafter
    torch.manual_seed(0)
    for p in d.parameters():
        p.data.add_(torch.randn_like(p) * 0.05)  # break the identity init so every path matters
    _, ctx, next_pos = prompt_context(pipe, sample_images(1))
    feats = d.fuse([h[0] for h in ctx.hidden_states])
    tokens = torch.cat([ctx.input_ids, torch.tensor([5])])
    positions = torch.cat([ctx.positions, torch.tensor([next_pos])])
    pairs, _, _ = build_pairs(d, tokens, positions, feats, ctx.input_embeds, ctx.n_images)
    obj = DraftObjective(d, ttt_steps=3, noise=0.0).eval()
    with torch.no_grad():
        outs = obj.unroll(pairs.tokens[None], pairs.positions[None], pairs.features[None], pairs.embeds[None],
                          pairs.image_vec[None])
        m = pairs.tokens.numel()
        j = m - 1  # the last slot, drafted at depth 3 from the real prefix ending at slot j - 2
        kv = DraftKV()
        sl = slice(0, j - 1)
        d(pairs.tokens[None, sl], pairs.features[None, sl], pairs.positions[None, sl], None, kv, pairs.embeds[None, sl],
          pairs.image_vec[None, sl])
        chain_feat = outs[0][:, j - 2]
        for depth, slot in enumerate((j - 1, j), start=1):
            mask = torch.ones(1, 1, kv.length + 1, dtype=torch.bool)
            h = d(pairs.tokens[None, slot : slot + 1], chain_feat[:, None], pairs.positions[None, slot : slot + 1], mask,
                  kv, pairs.embeds[None, slot : slot + 1], pairs.image_vec[None, slot : slot + 1])
            assert torch.allclose(h[0, 0], outs[depth][0, slot], atol=1e-4), depth
            chain_feat = h[:, 0]


def write_data(tmp_path, n=16, images=True):
    ims = sample_images(3)
    for i, im in enumerate(ims):
        im.save(tmp_path / f"im{i}.png")
    answers = ["a red circle at the top left and a blue square", "two green stars near the bottom right corner",
               "one small yellow triangle in the center"]
    lines = [{"images": [f"im{i % 3}.png"] if images else [], "messages": [
        {"role": "user", "content": "describe the picture"}, {"role": "assistant", "content": answers[i % 3]}]}
        for i in range(n)]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return path


def test_a_few_steps_lower_the_loss(pipes, tiny_dir, tmp_path):
    pipe = pipes("llava")
    from mmspec.data_tools.jsonl import read_conversations

    convs, _ = read_conversations(write_data(tmp_path, n=6))
    d = Drafter.for_target(pipe.target, vision_adaptor=True, feature_layers=(0, 2, 1))  # distinct, unordered layers
    exs = [teach(pipe.target, pipe.adapter, pipe.processor, c, d.config.feature_layers, True, 1024) for c in convs]
    assert all(int(e.assistant.sum()) > 3 for e in exs)
    obj = DraftObjective(d, ttt_steps=2, noise=0.0)
    opt = torch.optim.AdamW(d.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        loss, _ = obj(exs)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5
    assert d.vision.queries.grad is not None and d.vision.queries.grad.abs().sum() > 0  # the adaptor learns too


@pytest.fixture(scope="module")
def trained(tiny_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("trained")
    data = write_data(tmp, n=12)
    out = tmp / "drafter"
    metrics = train_drafter(str(tiny_dir("llava")), data, out, TrainConfig(max_steps=6, batch_size=4, lr=3e-3,
                            warmup_steps=1, eval_fraction=0.25, ttt_steps=2), device="cpu")
    return out, metrics, data


def test_trained_drafter_is_saved_and_lossless(trained, tiny_dir):
    out, metrics, _ = trained
    want = {f"depth{d}_{m}" for d in (1, 2) for m in ("acc", "loss", "accept_t1")}
    assert metrics["steps"] == 6 and set(metrics["held_out"]) == want
    assert not (out / "checkpoint").exists()
    pipe = mmspec.load(tiny_dir("llava"), out, device="cpu")
    assert pipe.drafter.vision is not None
    images = sample_images(2)
    inputs = pipe.prepare(PROMPT, images)
    ref = pipe.target.generate(**inputs, do_sample=False, max_new_tokens=40)[0, inputs["input_ids"].shape[1]:].tolist()
    assert pipe.generate(PROMPT, images, max_new_tokens=40).token_ids == ref


class Interrupted(Exception):
    pass


def run_until_first_checkpoint(monkeypatch, *args, **kwargs) -> None:
    """train_drafter(*args, **kwargs), stopped right after it writes its first checkpoint."""
    import mmspec.train as train_mod

    save = train_mod.save_checkpoint

    def save_then_die(*a, **kw):
        save(*a, **kw)
        raise Interrupted

    monkeypatch.setattr(train_mod, "save_checkpoint", save_then_die)
    with pytest.raises(Interrupted):
        train_drafter(*args, **kwargs)
    monkeypatch.undo()


def test_resumed_run_equals_an_uninterrupted_one(tiny_dir, tmp_path, monkeypatch, caplog):
    """Interrupted right after its step-2 checkpoint and rerun: the same weights, bit for bit, as the run that was
    never interrupted. With 3 batches an epoch and 2 a step, step 2 ends after the first batch of the second epoch, so
    the resumed run must restore that epoch's order and its place in it, the noise generator, AdamW and the schedule."""
    data = write_data(tmp_path, n=12)  # 12 conversations, batches of 4: 3 batches an epoch
    cfg = TrainConfig(max_steps=4, batch_size=4, grad_accum=2, lr=3e-3, warmup_steps=1, eval_fraction=0.0,
                      ttt_steps=2, save_every=2)
    target = str(tiny_dir("llava"))
    train_drafter(target, data, tmp_path / "whole", cfg, device="cpu")

    run_until_first_checkpoint(monkeypatch, target, data, tmp_path / "resumed", cfg, device="cpu")
    assert sorted(p.name for p in (tmp_path / "resumed").iterdir()) == ["checkpoint"]
    with caplog.at_level("INFO", logger="mmspec.train"):
        m = train_drafter(target, data, tmp_path / "resumed", cfg, device="cpu")
    assert m["steps"] == 4 and "resumed from" in caplog.text and "at step 2" in caplog.text
    assert not (tmp_path / "resumed" / "checkpoint").exists()
    whole = load_file(str(tmp_path / "whole" / "model.safetensors"))
    resumed = load_file(str(tmp_path / "resumed" / "model.safetensors"))
    assert whole.keys() == resumed.keys()
    assert all(torch.equal(whole[k], resumed[k]) for k in whole), [k for k in whole if not torch.equal(whole[k], resumed[k])]


def test_resume_refuses_a_checkpoint_of_another_run(tiny_dir, tmp_path, monkeypatch):
    """Another batch size would make the saved place in the epoch mean something else; a checkpoint whose weights do
    not fit is refused by the strict load; both name the checkpoint."""
    data = write_data(tmp_path, n=8)
    cfg = TrainConfig(max_steps=3, batch_size=4, warmup_steps=1, eval_fraction=0.0, ttt_steps=1, save_every=1,
                      vision_adaptor=False)
    run_until_first_checkpoint(monkeypatch, str(tiny_dir("llava")), data, tmp_path / "o", cfg, device="cpu")
    with pytest.raises(InputError, match=r"checkpoint.*different run: batch_size=4 \(now 2\)"):
        train_drafter(str(tiny_dir("llava")), data, tmp_path / "o", replace(cfg, batch_size=2), device="cpu")
    weights = tmp_path / "o" / "checkpoint" / "model.safetensors"
    state = load_file(str(weights))
    state["extra.weight"] = torch.zeros(1)
    save_file(state, str(weights))
    with pytest.raises(InputError, match=r"checkpoint.*do not fit.*extra\.weight"):
        train_drafter(str(tiny_dir("llava")), data, tmp_path / "o", cfg, device="cpu")


def test_teacher_cache_changes_nothing_but_time(tiny_dir, tmp_path):
    # 3 epochs over 8 conversations: the cached run reuses the teacher's signals, and must train the same weights
    data = write_data(tmp_path, n=8)
    outs, reuses = [], []
    for gb in (0.0, 1.0):
        cfg = TrainConfig(max_steps=6, batch_size=4, lr=3e-3, warmup_steps=1, eval_fraction=0.0, ttt_steps=2,
                          teacher_cache_gb=gb)
        m = train_drafter(str(tiny_dir("llava")), data, tmp_path / f"d{gb}", cfg, device="cpu")
        outs.append(load_file(str(tmp_path / f"d{gb}" / "model.safetensors")))
        reuses.append(m["teacher_cache_reuses"])
    assert reuses == [0, 16]
    assert outs[0].keys() == outs[1].keys()
    assert all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])
    with pytest.raises(ValueError, match="teacher_cache_gb"):
        TrainConfig(teacher_cache_gb=-1.0)


def test_output_dir_is_never_overwritten(tiny_dir, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "precious.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        train_drafter(str(tiny_dir("llava")), write_data(tmp_path), tmp_path / "out", device="cpu")
    assert (tmp_path / "out" / "precious.txt").read_text() == "mine"


def test_bad_data_from_the_cli(tiny_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n{oops\n')
    r = subprocess.run([sys.executable, "-m", "mmspec", "train-drafter", "--target", str(tiny_dir("llava")), "--data",
                        str(bad), "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "bad.jsonl:2" in r.stderr and "Traceback" not in r.stderr, r.stderr
    text = write_data(tmp_path, n=4)
    r = subprocess.run([sys.executable, "-m", "mmspec", "train-drafter", "--target", str(tiny_dir("text_llm")), "--data",
                        str(text), "--out", str(tmp_path / "o2"), "--no-vision-adaptor"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2 and "text-only" in r.stderr, r.stderr


def test_torchrun_two_processes_write_one_drafter(tiny_dir, tmp_path):
    data = write_data(tmp_path, n=8)
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533", "-m", "mmspec",
         "train-drafter", "--target", str(tiny_dir("llava")), "--data", str(data), "--out", str(out), "--max-steps", "2",
         "--batch-size", "2", "--eval-fraction", "0", "--ttt-steps", "2"],
        capture_output=True, text=True, timeout=600, env=env,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = json.loads((out / "training_metrics.json").read_text())
    assert metrics["processes"] == 2 and metrics["steps"] == 2
    assert sorted(p.name for p in out.iterdir()) == ["mmspec_drafter.json", "model.safetensors", "training_metrics.json"]
    Drafter.from_pretrained(out)


def test_rotary_table_equals_the_angles_computed_in_place(pipes):
    """The CPU's table lookup and the in-place angles an asynchronous device uses are the same numbers, and rotating
    by them equals the textbook rotate_half form."""
    d = Drafter.for_target(pipes("llava").target, vision_adaptor=False).eval()
    pos = torch.tensor([[0, 5, 700, 2047, 3000]])
    table_cos, table_sin = d._rotary(pos, torch.float32)
    cos, sin = d._angles(pos, torch.float32)
    assert torch.equal(table_cos, cos) and torch.equal(table_sin, sin)
    half = d.config.head_dim // 2
    x = torch.randn(1, 5, d.config.head_dim, generator=torch.Generator().manual_seed(1))
    a, b = x[..., :half], x[..., half:]
    plain_sin = torch.cat([-sin[..., :half], sin[..., half:]], -1)  # sin(pos * freq), both halves alike
    assert torch.equal(plain_sin[..., :half], plain_sin[..., half:])
    textbook = x * cos + torch.cat([-b, a], -1) * plain_sin
    assert torch.allclose(x * cos + x.roll(half, dims=-1) * sin, textbook, atol=1e-6)


def test_a_leaner_drafter_keeps_its_sizes_through_save_and_load(pipes, tmp_path):
    """intermediate_size / num_heads shrink the drafter's layer (its cost on a CPU follows its bytes); the head width,
    and so the rotary angles, stay the target's. Bad sizes are refused by name."""
    target = pipes("llava").target
    d = Drafter.for_target(target, vision_adaptor=True, intermediate_size=16, num_heads=1)
    c = d.config
    assert (c.intermediate_size, c.num_attention_heads, c.num_key_value_heads) == (16, 1, 1)
    assert c.head_dim == Drafter.for_target(target).config.head_dim
    back = Drafter.from_pretrained(d.save_pretrained(tmp_path / "lean"), target=target)
    assert back.config == c and back.gate_proj.weight.shape == (16, c.hidden_size)
    n = 3
    out = back(torch.zeros(1, n, dtype=torch.long), torch.randn(1, n, c.hidden_size), torch.arange(n)[None], None, None)
    assert out.shape == (1, n, c.hidden_size)
    for bad in (0, -2, 2.5):
        with pytest.raises(InputError, match="intermediate_size"):
            Drafter.for_target(target, intermediate_size=bad)
