"""mini-gen's data, tokenizer, VQ rule and the micro build of the whole gen path."""

import dataclasses
import json
import math
import re
import shutil

import pytest
import torch

import mmspec

from mmspec.data_tools.build_minis import GEN_PLANS, build_gen, main as build_minis_main
from mmspec.data_tools.gen_world import (IMAGE_PX, expected_answers, make_gen_dataset, object_mask, prompt_of,
                                         render_textured, sample_gen_scene)
from mmspec.data_tools.shapes_world import COLOURS, POSITION_PHRASES, Scene
from mmspec.data_tools.train_gen import (BOI, NUM_IMAGE_TOKENS, build_gen_model, chat_prompt, code_neighbours,
                                         guided_batch, load_mini_gen, make_processor, prompt_ids, swap_codes,
                                         train_gen_tokenizer, upscale)
from mmspec.data_tools.train_vq import encode_codes, judge_reconstructions


def _scenes(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [sample_gen_scene(g) for _ in range(n)]


def _pixels(im):
    return torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(im.height, im.width, 3).float()


@pytest.mark.parametrize("side", [IMAGE_PX, 64])
def test_render_is_pure_textured_and_keeps_colours(side):
    for scene in _scenes(12):
        im = render_textured(scene, side)
        assert im.size == (side, side) and im.mode == "RGB"
        assert im.tobytes() == render_textured(Scene.from_dict(scene.to_dict()), side).tobytes()
        px, mask = _pixels(im), object_mask(scene, side)
        # textured: the background is far from flat
        assert px[mask < 0.01].std(0).mean() > 5
        # but each object's mean colour is still nearest to its own named colour
        for o in scene.objects:
            alone = object_mask(Scene((o,), scene.background), side)
            mean = px[alone > 0.95].mean(0).tolist()
            nearest = min(COLOURS, key=lambda c: math.dist(COLOURS[c], mean))
            assert nearest == o.colour, (o, mean)


def test_scene_count_prompt_and_answers():
    g = torch.Generator().manual_seed(3)
    counts = set()
    for scene in _scenes(60, seed=1):
        counts.add(len(scene.objects))
        prompt = prompt_of(scene, g)
        for o in scene.objects:
            assert f"{o.colour} {o.shape} {POSITION_PHRASES[o.cell]}" in prompt
        assert len(re.findall(r"\ba (?:small|big|large) ", prompt)) == len(scene.objects)
        ans = expected_answers(scene)
        assert ans["count"] == len(scene.objects) and ans["colours"] == {o.colour for o in scene.objects}
    assert counts == {1, 2, 3}
    a, b = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert [prompt_of(s, a) for s in _scenes(5)] == [prompt_of(s, b) for s in _scenes(5)]


def test_dataset_is_seeded(tmp_path):
    p1 = make_gen_dataset(4, tmp_path / "a", seed=9)
    p2 = make_gen_dataset(4, tmp_path / "b", seed=9)
    assert p1.read_bytes() == p2.read_bytes()
    rows = [json.loads(x) for x in p1.read_text().splitlines()]
    assert len(rows) == 4 and all((p1.parent / r["image"]).is_file() for r in rows)
    assert [json.loads(x) for x in (tmp_path / "a" / "train_prompts.jsonl").read_text().splitlines()] == \
        [{"prompt": r["prompt"]} for r in rows]


@pytest.fixture(scope="module")
def tokenizer():
    g = torch.Generator().manual_seed(0)
    return train_gen_tokenizer([prompt_of(s, g) for s in _scenes(300)])


def test_processor_builds_janus_image_prompt(tokenizer):
    processor = make_processor(tokenizer)
    text = chat_prompt(processor, "a small red circle in the center")
    assert text == "<s><|User|>: a small red circle in the center\n\n<|Assistant|>:"
    ids = processor(text=text, generation_mode="image", return_tensors="pt")["input_ids"][0].tolist()
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.convert_tokens_to_ids(BOI)
    assert ids.count(tokenizer.bos_token_id) == 1
    assert prompt_ids(tokenizer, "a small red circle in the center") == ids


def test_encode_codes_uses_the_rule_decode_inverts(tokenizer):
    vq = build_gen_model(tokenizer, "micro").model.vqmodel.eval()
    x = torch.rand(2, 3, IMAGE_PX, IMAGE_PX) * 2 - 1
    codes = encode_codes(vq, x)
    assert codes.shape == (2, NUM_IMAGE_TOKENS)
    with torch.no_grad():
        z = torch.nn.functional.normalize(vq.quant_conv(vq.encoder(x)).permute(0, 2, 3, 1).flatten(1, 2), dim=-1)
        picked = vq.quantize.get_codebook_entry(codes).permute(0, 2, 3, 1).flatten(1, 2)  # what decode() reads
        best = (z @ torch.nn.functional.normalize(vq.quantize.embedding.weight, dim=-1).t()).max(-1).values
    assert torch.allclose((z * picked).sum(-1), best, atol=1e-5)


def test_judge_reads_renders_and_reconstructions(tokenizer):
    """The VQ check a build runs before its generator: the judge's verdicts on renders and on an untrained VQ's
    reconstructions (noise, so they cannot all pass)."""
    scenes = _scenes(4, seed=5)
    renders = torch.stack([_pixels(render_textured(s)).to(torch.uint8).permute(2, 0, 1) for s in scenes])
    vq = build_gen_model(tokenizer, "micro").model.vqmodel.eval()
    out = judge_reconstructions(vq, renders, [s.to_dict() for s in scenes], n=4)
    assert out["n"] == 4 and set(out) == {"n", "rendered", "reconstructed"}
    assert out["rendered"]["faithful"] >= 0.75  # the judge reads 97 % of renders right (docs/quality.md)
    assert out["reconstructed"]["faithful"] < out["rendered"]["faithful"]


def test_code_swaps_stay_among_cosine_neighbours():
    codebook = torch.randn(32, 8, generator=torch.Generator().manual_seed(0))
    nb = code_neighbours(codebook, 4)
    e = torch.nn.functional.normalize(codebook, dim=-1)
    sim = e @ e.t()
    assert torch.equal(nb[0], sim[0, 1:].topk(4).indices + 1)  # nearest first, the code itself excluded
    codes = torch.randint(32, (64, 64), generator=torch.Generator().manual_seed(1))
    out = swap_codes(codes, nb, 0.5, torch.Generator().manual_seed(2))
    changed = out != codes
    assert 0.4 < changed.float().mean() < 0.6
    assert (nb[codes[changed]] == out[changed][:, None]).any(-1).all()
    assert torch.equal(swap_codes(codes, nb, 0.0, torch.Generator()), codes)


def test_micro_gen_build(tmp_path):
    out, assets, work = tmp_path / "models", tmp_path / "assets", tmp_path / "work"
    info = build_gen(work, out, GEN_PLANS["micro"], assets)
    assert set(info["stages_s"]) == {"gen-data", "gen-tokenizer", "gen-vq", "gen-generator", "gen-drafter"}
    drafter = mmspec.Drafter.from_pretrained(out / "mini-gen-drafter")
    assert drafter.config.modality == "image" and drafter.config.extra["target"] == "mini-gen"
    assert info["verify"]["codes_shape"] == [GEN_PLANS["micro"].n_samples, NUM_IMAGE_TOKENS]
    model, processor = load_mini_gen(out / "mini-gen")
    assert model.generation_config.generation_kwargs["boi_token_id"] == processor.tokenizer.convert_tokens_to_ids(BOI)
    recorded = json.loads((out / "mini-gen" / "build_info.json").read_text())
    assert recorded["generator"]["steps"] == GEN_PLANS["micro"].gen_max_steps and "psnr" in recorded["vq"]
    inputs = processor(text=chat_prompt(processor, "a big blue square in the center"), generation_mode="image",
                       return_tensors="pt")
    torch.manual_seed(0)
    codes = model.generate(**inputs, generation_mode="image", do_sample=True, guidance_scale=5.0)
    assert codes.shape == (1, NUM_IMAGE_TOKENS)
    assert 0 <= codes.min() and codes.max() < model.config.vq_config.num_embeddings
    pixels = processor.postprocess(list(model.decode_image_tokens(codes).float()), return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, IMAGE_PX, IMAGE_PX) and pixels.dtype == torch.uint8
    prompts = [json.loads(x) for x in (assets / "gen_prompts.jsonl").read_text().splitlines()]
    assert prompts and set(prompts[0]) == {"prompt", "scene"}
    # A second run finds every stage built: nothing trains again.
    again = build_gen(work, out, GEN_PLANS["micro"], assets)
    assert again["stages_s"] == {}
    # A larger budget continues the finished generator (a build spread over sessions); the verification and the
    # drafter are made again from it, and the old drafter is kept aside, not resumed from.
    micro = GEN_PLANS["micro"]
    longer = dataclasses.replace(micro, gen_max_steps=micro.gen_max_steps + 2, gen_minutes=10.0)
    more = build_gen(work, out, longer, assets)
    assert set(more["stages_s"]) == {"gen-generator", "gen-drafter"}
    recorded = json.loads((out / "mini-gen" / "build_info.json").read_text())
    assert more["generator"]["steps"] == recorded["generator"]["steps"] == longer.gen_max_steps
    assert recorded["verify"] == more["verify"] and (work / "generator" / "verify.json").exists()
    assert (work / f"drafter-for-generator-step-{micro.gen_max_steps}" / "model.safetensors").exists()
    assert build_gen(work, out, longer, assets)["stages_s"] == {}
    (work / "generator" / "ckpt.pt").unlink()  # without its checkpoint a longer run would start over: refused
    with pytest.raises(FileNotFoundError, match="ckpt.pt is gone"):
        build_gen(work, out, dataclasses.replace(longer, gen_max_steps=longer.gen_max_steps + 2), assets)
    assert (work / "generator" / "done.json").exists()


def test_render_rejects_a_size_that_does_not_divide_the_geometry():
    with pytest.raises(mmspec.errors.InputError, match="divide 64"):
        render_textured(_scenes(1)[0], 48)


def test_upscale_starts_as_the_source_and_every_block_trains():
    """Depth up-scaling: the deeper model computes exactly the source's logits at init (added blocks are the
    identity), yet every added block gets a gradient on its output projections (it can start doing work)."""
    tok = train_gen_tokenizer(["a big red circle at the top left", "draw a small blue square"] * 8)
    src, deep = build_gen_model(tok, "micro", seed=1), build_gen_model(tok, "micro-deep", seed=2)
    assert upscale(deep, src) == [0, None, None]
    ids = [prompt_ids(tok, "draw a small blue square")]
    codes = torch.randint(64, (1, 64), generator=torch.Generator().manual_seed(0))
    pad, keep = tok.pad_token_id, {tok.bos_token_id, tok.convert_tokens_to_ids(BOI)}
    drop = torch.tensor([False])
    with torch.no_grad():
        assert torch.equal(guided_batch(src, ids, codes, pad, keep, drop), guided_batch(deep, ids, codes, pad, keep, drop))
    guided_batch(deep, ids, codes, pad, keep, drop).logsumexp(-1).sum().backward()
    for block in deep.model.language_model.layers[1:]:
        assert block.self_attn.o_proj.weight.grad.abs().sum() > 0 and block.mlp.down_proj.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="multiple"):
        upscale(build_gen_model(tok, "micro"), deep)


def test_deep_up_scales_from_a_fine_build(tmp_path):
    """The CPU route over sessions (docs/mini-gen.md, "--size fine"): a fine build (the base's blocks on 16 x 16
    codes) is itself a mini-gen a deep build can start from; its 64-px VQ is fine-tuned again, codebook unchanged."""
    base, fine, deep = tmp_path / "base", tmp_path / "fine", tmp_path / "deep"
    build_gen(base, base, GEN_PLANS["micro"], stop_after="generator")
    info = build_gen(fine, fine, GEN_PLANS["micro-fine"], stop_after="generator", init_from=base / "mini-gen")
    assert info["verify"]["codes_shape"] == [1, 256] and len(info["generator"]["residual_updates"]) == 1
    info = build_gen(deep, deep, GEN_PLANS["micro-deep"], stop_after="generator", init_from=fine / "mini-gen")
    assert info["generator"]["init_from"] == str(fine / "mini-gen") and info["verify"]["codes_shape"] == [1, 256]
    src, _ = load_mini_gen(fine / "mini-gen")
    out, _ = load_mini_gen(deep / "mini-gen")
    assert torch.equal(out.model.vqmodel.quantize.embedding.weight, src.model.vqmodel.quantize.embedding.weight)
    assert len(out.model.language_model.layers) == 3


def test_build_command_refuses_a_size_of_the_other_family(tmp_path, capsys):
    """--size names a plan of the family --only picks: mini-gen's "fine" is no mini-vlm plan, and the error says
    which sizes there are, before any stage writes into --work."""
    assert build_minis_main(["--size", "fine", "--work", str(tmp_path / "w"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "--size fine is not a mini-vlm plan" in err and "deep" in err
    assert not (tmp_path / "w").exists()


def test_micro_deep_gen_build(tmp_path):
    """The deep path end to end: a base build, then 64-px data, the base's VQ fine-tuned with its codebook frozen,
    the generator up-scaled from the base and trained; 16 x 16 codes; per-block residual updates recorded."""
    base, work = tmp_path / "base", tmp_path / "work"
    build_gen(base, base, GEN_PLANS["micro"], stop_after="generator")
    with pytest.raises(FileNotFoundError, match="not a mini-gen"):
        build_gen(work, tmp_path / "out", GEN_PLANS["micro-deep"], init_from=tmp_path)
    info = build_gen(work, tmp_path / "out", GEN_PLANS["micro-deep"], init_from=base / "mini-gen")
    assert info["verify"]["codes_shape"] == [1, 256] and info["verify"]["image_size"] == [64, 64]
    assert info["generator"]["init_from"] == str(base / "mini-gen")
    assert len(info["generator"]["residual_updates"]) == 3
    vq = json.loads((work / "vq" / "vq_metrics.json").read_text())
    assert vq["from"] == str(base / "mini-gen") and "psnr" in vq["before_finetune"]
    src, _ = load_mini_gen(base / "mini-gen")
    deep, processor = load_mini_gen(tmp_path / "out" / "mini-gen")
    assert torch.equal(deep.model.vqmodel.quantize.embedding.weight, src.model.vqmodel.quantize.embedding.weight)
    assert processor.image_processor.size["height"] == 64
    sidecar = json.loads((tmp_path / "out" / "mini-gen" / "mmspec_gen.json").read_text())
    assert sidecar["grid"] == [16, 16] and sidecar["num_image_tokens"] == 256

    # The GPU shot (docs/mini-gen.md): a work folder brought back without its data, checkpoints and drafter, the
    # export inside it, resumes on another machine with the seeded data redrawn and only the drafter distilled.
    moved = tmp_path / "moved"
    shutil.copytree(work, moved, ignore=shutil.ignore_patterns("data", "ckpt.pt", "final.pt", "codes.pt", "drafter*"))
    shutil.copytree(tmp_path / "out" / "mini-gen", moved / "out" / "mini-gen")
    again = build_gen(moved, moved / "out", GEN_PLANS["micro-deep"], init_from=base / "mini-gen")
    assert set(again["stages_s"]) == {"gen-data", "gen-drafter"}
    assert again["verify"] == info["verify"] and again["generator"] == info["generator"]
    assert (moved / "data" / "train.jsonl").read_text() == (work / "data" / "train.jsonl").read_text()
    assert (moved / "out" / "mini-gen-drafter" / "model.safetensors").exists()
