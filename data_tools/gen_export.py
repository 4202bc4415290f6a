"""mini-gen's export (fp16 weights, processor, the sidecar Janus needs) and its verification: the CFG top-1
probability, faithfulness judged by mini-vlm, and the sample grid in docs/mini-gen-samples.png.

Split from ``train_gen`` along the export seam.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from mmspec.hardware import training_device

from .train_gen import (BOI, IMAGE, SIDECAR, guided_batch, load_prompt_records, chat_prompt,
                        generation_config, load_mini_gen, make_processor)

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------------------ export
def export_gen(model, tok_dir: Path, out_dir: Path, info: dict) -> None:
    """fp16 safetensors + processor + mmspec_gen.json + build_info.json, swapped into ``out_dir`` in one rename."""
    import copy
    import shutil

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    tmp, old = out_dir.with_name(out_dir.name + ".tmp"), out_dir.with_name(out_dir.name + ".old")
    for p in (tmp, old):
        shutil.rmtree(p, ignore_errors=True)
    half = copy.deepcopy(model).half().eval()
    half.generation_config = generation_config(tokenizer)
    half.save_pretrained(str(tmp))
    make_processor(tokenizer, model.config.vision_config.image_size).save_pretrained(str(tmp))
    (tmp / SIDECAR).write_text(json.dumps(sidecar(tokenizer, model.config), indent=1) + "\n")
    (tmp / "build_info.json").write_text(json.dumps(info, indent=1, default=str) + "\n")
    for f in tmp.iterdir():
        f.chmod(0o644)  # save_pretrained writes the weights owner-only; the package is read by everyone
    if out_dir.exists():
        out_dir.rename(old)
    tmp.rename(out_dir)
    shutil.rmtree(old, ignore_errors=True)
    logger.info("exported mini-gen to %s", out_dir)


def sidecar(tokenizer, config) -> dict:
    vision = config.vision_config
    return {"boi_token_id": tokenizer.convert_tokens_to_ids(BOI),
            "image_token_id": tokenizer.convert_tokens_to_ids(IMAGE),
            "num_image_tokens": vision.num_image_tokens, "image_px": vision.image_size,
            "grid": [vision.image_size // vision.patch_size] * 2,
            "pixel_range": "decode() returns -1..1 (processor mean = std = 0.5); processor.postprocess maps to 0..255",
            "prompt_format": "<s><|User|>: {prompt}\n\n<|Assistant|>:<begin_of_image>",
            "quantisation": "l2-normalised encoder output and codebook, nearest by cosine",
            "understanding_tower": "tiny and untrained"}


# ------------------------------------------------------------------------------------------------------ verification
def cfg_top1(model, input_ids: torch.Tensor, codes: torch.Tensor, pad: int, keep: set[int],
             guidance: float = 5.0) -> torch.Tensor:
    """The target's top-1 probability at each code position [N] of one prompt's codes [1, N], with CFG at T=1:
    softmax(uncond + guidance * (cond - uncond)), the combination Janus's ClassifierFreeGuidanceLogitsProcessor uses."""
    ids = input_ids[0].tolist()
    two = guided_batch(model, [ids, ids], codes.repeat(2, 1), pad, keep, torch.tensor([False, True]))
    logits = two[1] + guidance * (two[0] - two[1])
    return logits.softmax(-1).max(-1).values


def to_pil(model, processor, codes: torch.Tensor) -> list:
    """codes [B, N] -> PIL images through the stock decode and processor.postprocess (its "PIL.Image.Image"
    return type fails in transformers 5.24, so the uint8 tensors are converted here)."""
    from PIL import Image

    pixels = model.decode_image_tokens(codes.to(model.device)).float().cpu()  # [B, px, px, 3], -1..1
    images = processor.postprocess(list(pixels), return_tensors="pt")["pixel_values"]  # [B, 3, px, px] uint8
    return [Image.fromarray(im.permute(1, 2, 0).contiguous().numpy()) for im in images]


def sample_grid(images: list, prompts: list[str], path: Path, side: int = 128) -> None:
    """Images in a 4-wide grid, each over its (wrapped) prompt."""
    import textwrap

    from PIL import Image, ImageDraw

    text_h, cols = 96, 4
    rows = (len(images) + cols - 1) // cols
    grid = Image.new("RGB", (cols * (side + 8), rows * (side + text_h)), "white")
    draw = ImageDraw.Draw(grid)
    for i, (im, prompt) in enumerate(zip(images, prompts)):
        x, y = (i % cols) * (side + 8), (i // cols) * (side + text_h)
        grid.paste(im.resize((side, side), Image.NEAREST), (x, y))
        draw.multiline_text((x, y + side + 2), "\n".join(textwrap.wrap(prompt, 24)[:8]), fill="black")
    grid.save(path)


@torch.no_grad()
def verify_gen(model_dir: Path, heldout_jsonl: Path, n: int, samples_png: Path | None, seed: int = 0,
               judge_n: int = 0) -> dict:
    """Reload the export (on the training device), generate max(n, judge_n) held-out prompts with Janus's own generate (CFG 5, T=1), measure
    the target's mean top-1 probability on those codes, save a grid of the first n, and have the mini-vlm judge
    the first judge_n (faithfulness, mmspec.quality)."""
    model, processor = load_mini_gen(model_dir)
    model.to(training_device())
    tokenizer = processor.tokenizer
    pad, keep = tokenizer.pad_token_id, {tokenizer.bos_token_id, tokenizer.convert_tokens_to_ids(BOI)}
    records = load_prompt_records(heldout_jsonl, max(n, judge_n))
    torch.manual_seed(seed)  # generate samples with torch's global generator
    all_codes, top1 = [], []
    for r in records:
        inputs = processor(text=chat_prompt(processor, r["prompt"]), generation_mode="image",
                           return_tensors="pt").to(model.device)
        codes = model.generate(**inputs, generation_mode="image", do_sample=True, guidance_scale=5.0)
        if codes.shape != (1, model.config.vision_config.num_image_tokens):
            raise RuntimeError(f"generate returned {tuple(codes.shape)}, expected "
                               f"(1, {model.config.vision_config.num_image_tokens})")
        all_codes.append(codes)
        top1.append(cfg_top1(model, inputs["input_ids"], codes, pad, keep))
    codes = torch.cat(all_codes)
    images = to_pil(model, processor, codes)
    if samples_png is not None:
        samples_png.parent.mkdir(parents=True, exist_ok=True)
        sample_grid(images[:n], [r["prompt"] for r in records[:n]], samples_png)
    result = {"n": len(records), "codes_shape": list(codes.shape), "image_size": list(images[0].size),
              "mean_top1_prob_cfg5_t1": round(torch.stack(top1).mean().item(), 4),
              "distinct_codes": int(codes.unique().numel())}
    if judge_n > 0:
        from mmspec import quality

        from .gen_world import expected_answers
        from .shapes_world import Scene

        expected = [expected_answers(Scene.from_dict(r["scene"])) for r in records[:judge_n]]
        verdicts = quality.judge_images(images[:judge_n], expected, full=True)
        result["judge_cfg5_t1"] = {"n": judge_n, **{k: round(sum(bool(v[k]) for v in verdicts) / judge_n, 3)
                                                   for k in ("faithful", "count_ok", "colours_ok", "absent_ok")}}
    logger.info("verified %s: %s", model_dir, result)
    return result


def finish_gen_export(gen_dir: Path, tok_dir: Path, out_dir: Path, heldout_jsonl: Path, n_samples: int,
                      samples_png: Path | None, info: dict, judge_n: int = 0) -> dict:
    """Verify the final export and record the result in its build_info.json (kept in gen_dir/verify.json)."""
    done = gen_dir / "verify.json"
    if done.exists() and (out_dir / "build_info.json").exists():
        return json.loads(done.read_text())
    result = verify_gen(out_dir, heldout_jsonl, n_samples, samples_png or gen_dir / "samples.png", judge_n=judge_n)
    done.write_text(json.dumps(result, indent=1) + "\n")
    recorded = json.loads((out_dir / "build_info.json").read_text())
    recorded.update({**info, "verify": result})
    (out_dir / "build_info.json").write_text(json.dumps(recorded, indent=1, default=str) + "\n")
    return result
