"""Grading mini-vlm: greedy answers to held-out shapes-world questions, descriptions checked in full with the
world's own grammar, and how much each decoder block changes the residual stream (the evidence that a deep model
is deep: a block that returns its input unchanged is depth in name only).

Split from ``train_target`` along the evaluation seam.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import AutoModelForImageTextToText, AutoProcessor

from mmspec.hardware import training_device

from .shapes_world import COLOURS, NUMBER_WORDS, PLURALS, SHAPES, TASKS, Scene, check_answer, parse_count
from .target_data import load_scene_images, chat_messages, load_records

_SUMMARY_RE = re.compile(r"(In total:|Altogether:|Summary:)(.*)$")
_SHAPE_COUNT_RE = re.compile(rf"\b(\w+) ({'|'.join(sorted([*SHAPES, *PLURALS.values()], key=len, reverse=True))})\b")


def description_correct(example: dict, text: str) -> bool:
    """A description is correct when it names every object with the right size, colour, shape and position
    (``check_answer``), and its counts are right: the opening's number of objects, and the closing summary's count
    of each shape and list of colours (the grammar of ``shapes_world._describe``)."""
    if not check_answer(example, text):
        return False
    scene = Scene.from_dict(example["scene"])
    first, _, rest = text.strip().partition(".")
    if parse_count(first) != len(scene.objects):
        return False
    summary = _SUMMARY_RE.search(rest.strip())
    if summary is None:
        return False
    said = {}
    for word, noun in _SHAPE_COUNT_RE.findall(summary.group(2)):
        if word.lower() in NUMBER_WORDS:
            shape = noun if noun in SHAPES else next(s for s, p in PLURALS.items() if p == noun)
            said[shape] = said.get(shape, 0) + NUMBER_WORDS.index(word.lower())
    truth = {s: sum(o.shape == s for o in scene.objects) for s in SHAPES}
    colours = [c for c in COLOURS if re.search(rf"\b{c}\b", summary.group(2))]
    return said == {s: k for s, k in truth.items() if k} and colours == [c for c in COLOURS if any(
        o.colour == c for o in scene.objects)]


@torch.no_grad()
def image_spread(model, pixel_values: torch.Tensor) -> float:
    """How much the projected image tokens differ between images, relative to their size (pixel_values: (N, 3, H, W)).

    About 0.7 at initialisation. A from-scratch LLaVA can collapse into ignoring its images: the vision tower's
    output grows a large image-independent component and this ratio falls towards 0 while the loss still falls on
    the text prior alone. Logged so such a run is stopped early.
    """
    feats = tower_image_tokens(model, pixel_values)
    return float(feats.float().std(0).mean() / feats.float().std().clamp_min(1e-12))


def tower_image_tokens(model, pixel_values: torch.Tensor) -> torch.Tensor:
    feats = model.model.get_image_features(pixel_values=pixel_values).pooler_output
    return torch.stack(list(feats)) if isinstance(feats, (list, tuple)) else feats  # (N, tokens, hidden)


def load_for_eval(model_dir: str | Path, device: torch.device | None = None):
    """(model in fp32 on ``device`` (default: the training device), processor) of a saved mini-vlm."""
    device = device or training_device()
    model = AutoModelForImageTextToText.from_pretrained(str(model_dir), dtype=torch.float32,
                                                        attn_implementation="sdpa").to(device).eval()
    return model, AutoProcessor.from_pretrained(str(model_dir))


@torch.no_grad()
def evaluate_target(model_dir: str | Path, eval_jsonl: str | Path, n: int | None = None, batch_size: int = 16,
                    predictions_out: str | Path | None = None, device: torch.device | None = None) -> dict:
    """Greedy answers to the first ``n`` held-out examples, graded with ``check_answer`` (descriptions with
    :func:`description_correct`): {task: accuracy, ...}.

    ``overall`` is the accuracy over all graded examples; ``predictions_out`` (optional) receives one JSON line per
    example with the question, the model's answer, the reference and whether it was graded correct.
    """
    model, processor = load_for_eval(model_dir, device)
    results, preds = grade(model, processor, load_records(eval_jsonl)[:n], batch_size)
    if predictions_out is not None:
        with open(predictions_out, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(p) + "\n" for p in preds)
    return results


@torch.no_grad()
def grade(model, processor, records: list[dict], batch_size: int = 16) -> tuple[dict, list[dict]]:
    """({task: accuracy, "overall": ...}, predictions) of greedy answers by an in-memory model to ``records``.
    ``describe_objects`` is the share of descriptions whose objects are right, counts aside."""
    was_training, side = model.training, processor.tokenizer.padding_side
    model.eval()
    processor.tokenizer.padding_side = "left"  # batched generation appends on the right
    by_task: dict[str, list[dict]] = {}
    for r in records:
        by_task.setdefault(r["task"], []).append(r)
    results, preds = {}, []
    bar = tqdm(total=len(records), desc="evaluate mini-vlm", unit="ex", disable=None, leave=False)
    for task in sorted(by_task, key=lambda t: TASKS.index(t) if t in TASKS else len(TASKS)):
        rs = by_task[task]
        for s in range(0, len(rs), batch_size):
            chunk = rs[s:s + batch_size]
            answers = _answer(model, processor, chunk, 224 if task == "describe" else 48)
            for r, a in zip(chunk, answers):
                ok = description_correct(r, a) if task == "describe" else check_answer(r, a)
                preds.append({"task": task, "question": r["messages"][0]["content"], "answer": a.strip(),
                              "reference": r["messages"][1]["content"], "correct": bool(ok),
                              **({"objects_correct": bool(check_answer(r, a))} if task == "describe" else {})})
            bar.update(len(chunk))
        results[task] = round(sum(p["correct"] for p in preds if p["task"] == task) / len(rs), 4)
        if task == "describe":
            results["describe_objects"] = round(sum(p["objects_correct"] for p in preds if p["task"] == task)
                                                / len(rs), 4)
    bar.close()
    results["overall"] = round(sum(p["correct"] for p in preds) / max(1, len(preds)), 4)
    processor.tokenizer.padding_side = side
    model.train(was_training)
    return results, preds


def _answer(model, processor, chunk: list[dict], max_new_tokens: int) -> list[str]:
    texts = [processor.apply_chat_template(chat_messages(r, with_answer=False), add_generation_prompt=True,
                                           tokenize=False) for r in chunk]
    images = [im for r in chunk for im in load_scene_images(r["images"])]
    inputs = processor(text=texts, images=images or None, padding=True, return_tensors="pt").to(model.device)
    out = model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens)
    return processor.tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


@torch.no_grad()
def block_updates(layers, forwards) -> list[float]:
    """Per decoder block, the mean over counted tokens of ||block(h) - h|| / ||h||: how much of the residual stream
    the block rewrites. ``forwards`` yields zero-argument callables; each runs one forward through the model that
    owns ``layers`` and returns the bool mask [B, T] of the positions to count (padding excluded)."""
    sums, count = torch.zeros(len(layers), dtype=torch.float64), 0
    seen: dict[int, torch.Tensor] = {}

    def hook(k):
        def fn(_module, args, kwargs, output):
            h_in = args[0] if args else kwargs["hidden_states"]
            h_out = output[0] if isinstance(output, tuple) else output
            seen[k] = (h_out.float() - h_in.float()).norm(dim=-1) / h_in.float().norm(dim=-1).clamp_min(1e-6)
        return fn

    handles = [layer.register_forward_hook(hook(k), with_kwargs=True) for k, layer in enumerate(layers)]
    try:
        for forward in forwards:
            mask = forward().bool()
            for k in range(len(layers)):
                sums[k] += seen[k][mask.to(seen[k].device)].double().sum().cpu()
            count += int(mask.sum())
    finally:
        for h in handles:
            h.remove()
    return [round(float(x) / max(1, count), 4) for x in sums]


def residual_updates(model, processor, records: list[dict], batch_size: int = 16) -> list[float]:
    """``block_updates`` of a mini-vlm on held-out conversations (prompt and reference answer)."""
    processor.tokenizer.padding_side = "right"

    def forward(chunk):
        def run():
            texts = [processor.apply_chat_template(chat_messages(r), tokenize=False) for r in chunk]
            images = [im for r in chunk for im in load_scene_images(r["images"])]
            inputs = processor(text=texts, images=images or None, padding=True, return_tensors="pt").to(model.device)
            model(**inputs)
            return inputs["attention_mask"]
        return run

    chunks = (records[s:s + batch_size] for s in range(0, len(records), batch_size))
    return block_updates(model.model.language_model.layers, map(forward, chunks))
