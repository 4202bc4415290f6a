"""Rebuild every built-in mini model from nothing: `python -m mmspec.data_tools.build_minis`.

    shapes-world data -> tokenizer -> mini-vlm (vision warm-up, joint run, short-answer and counting stages)
      -> mini-vlm's own answers (regenerate)
      -> mini-vlm-vispec + mini-vlm-eagle (train-drafter, same data and steps) -> mini-vlm-assistant (distilled)
      -> fp16 safetensors under mmspec/models/, a sample scene under mmspec/assets/, build_info.json

Every stage is seeded and skipped when its output already exists in --work, so an interrupted build resumes, also
on another machine (work/stages.json keeps each stage's seconds and device). Training runs on cuda when available,
else on the CPU. The default sizes take about 1.6 hours on a 2-core CPU (docs/mini-models.md: where the time goes,
and the pilots behind the recipe); --size micro runs the whole path in a minute (the test suite does). --size deep
is issue #23's 24-layer mini-vlm, sized for a GPU: `--stop-after target --target-minutes J Q C` trains and grades
it there with each decoder stage capped in minutes, and the same command without them resumes with the drafters
anywhere.

`--only gen` builds mini-gen, the image generator, instead (docs/mini-gen.md):
    gen-world data -> tokenizer -> VQ -> generator (early export, final export) -> verification -> gen_prompts.jsonl
with --size fine (4 blocks on 16 x 16 codes) and deep (12 blocks) up-scaled from a trained build (--init-from).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger("mmspec.build_minis")

PACKAGE = Path(__file__).resolve().parent.parent / "mmspec"


@dataclass(frozen=True)
class BuildPlan:
    size: str = "mini"
    target_size: str = "mini"  # train_target.SIZES: "mini" is 6 decoder blocks of 384, "deep" 24 of 256 (issue #23)
    n_train: int = 40_000
    n_eval: int = 700
    n_drafter: int = 700  # conversations the target re-answers for drafter and assistant training
    shards: int = 1  # the training sets are drawn in this many seeded parts, in parallel (same data on any machine)
    target_vision_steps: int = 700  # vision-only warm-up of mini-vlm's tower on the scene labels (then frozen)
    # The recipe: a vision warm-up stands in for a pretrained CLIP; then, tower frozen, a long joint run whose
    # token-weighted descriptions teach the decoder to bind a question to its object, a short-answer stage and a
    # counting stage (both weighing every answer the same) that lift colour and count past the 95 % bars. ~95 min,
    # compute-bound, and every shorter or cheaper variant piloted so far counted worse: docs/mini-models.md has them
    # all (change, minutes, accuracies, verdict), so check there before trying another.
    target_steps: int = 2_400
    target_batch: int = 32
    target_lr: float = 1e-3
    # the question stages' batches (None: target_batch); they re-balance answers, which takes optimizer steps more
    # than conversations, so a GPU plan keeps them smaller than the joint run's
    qa_batch: int | None = None
    count_batch: int | None = None
    qa_steps: int = 1_200  # then short answers only, each answer weighing the same (see QA_SHARE)
    qa_lr: float = 5e-4
    n_count: int = 30_000  # fresh count questions for the counting stage (see COUNT_SHARE)
    count_steps: int = 1_800
    count_lr: float = 3e-4
    # Each decoder stage may be capped in minutes (--target-minutes): the schedule then follows the clock, the steps
    # are upper bounds, and each stage's train_metrics.json records the steps it ran.
    target_minutes: tuple[float, float, float] | None = None  # joint, short-answer, counting
    # the share of descriptions the short-answer and counting stages keep (see QA_SHARE, COUNT_MIX_SHARE)
    qa_describe_share: float = 0.1
    count_describe_share: float = 0.05
    # Drafters train briefly: longer runs lifted eagle's tau but not vispec's (docs/mini-models.md).
    drafter_steps: int = 400
    drafter_batch: int = 8
    assistant_steps: int = 300
    max_new_tokens: int = 150
    # held-out descriptions the stage monitor grades beside its 96 short answers; the counting stage becomes the
    # target only when the monitor's overall share does not fall (see _promote)
    monitor_describe: int = 0
    seed: int = 0


PLANS = {
    "mini": BuildPlan(),  # the shipped mini-vlm family (2-core CPU, ~95 min)
    # Issue #23's deep mini-vlm, sized for a GPU: 5x the scenes, a joint batch of 512 (a step of the 24 x 256
    # decoder is launch-bound on a GPU, so a 4x batch costs little more per step), question stages at 128 with
    # fresh count questions, descriptions kept in them. Neither GPU shot so far reached the bars (batch 128 counted
    # 47 % and described 60 %; this plan 71 % and 29 %): docs/mini-models.md, "The deep mini-vlm".
    "deep": BuildPlan(size="deep", target_size="deep", n_train=200_000, shards=16, target_steps=12_000,
                      target_batch=512, qa_batch=128, count_batch=128, qa_steps=3_000, n_count=100_000,
                      count_steps=3_000, qa_describe_share=0.3, count_describe_share=0.25, monitor_describe=32),
    "micro": BuildPlan(size="micro", target_size="micro", n_train=48, n_eval=8, n_drafter=12, shards=2,
                       target_vision_steps=3, target_steps=6,
                       # a stronger short-answer step teaches the micro model to stop at once (empty answers)
                       target_batch=8, qa_steps=3, qa_lr=1e-5, n_count=16, count_steps=3, count_lr=1e-5,
                       drafter_steps=3, drafter_batch=4, assistant_steps=3, max_new_tokens=24),
}
# The share of each task's training conversations the short-answer stage keeps: mostly count and colour, the
# questions the joint run leaves the decoder binding to the wrong object; a few descriptions (the plan's
# qa_describe_share) and the other tasks stay in so the long answers the drafters learn from are not forgotten.
QA_SHARE = {"count": 1.0, "colour": 1.0, "shape": 0.3, "position": 0.3, "yesno": 0.5, "compare": 0.5}
# The counting stage: fresh count questions with the answer "1" kept at a quarter, so the answers 0-4 are about
# equally likely and answering "one" (the short-answer stage's prior) stops paying, mixed with part of the other
# tasks so colour and the long answers hold. Fresh scenes counted better than re-balancing train.jsonl's own count
# questions, and the tower stays frozen here too (docs/mini-models.md).
COUNT_SHARE = {"count": 1.0, "count:1": 0.25}
COUNT_MIX_SHARE = {"colour": 0.5, "shape": 0.15, "position": 0.15, "yesno": 0.25, "compare": 0.25}
COUNT_SEED_OFFSET = 1_234
COUNT_SEED_OFFSET_TRAIN = 5
# held-out scenes get a seed far from the training ones (the same offset `train_target`'s CLI uses)
EVAL_SEED_OFFSET = 1_000_003
TEST_SEED_OFFSET = 2_000_003
DRAFTER_SEED_OFFSET = 7
RESIDUAL_RECORDS = 64  # held-out (test) conversations the per-block residual updates are measured on


def _stage(name: str, done: Path):
    """Decorator-free stage guard: log and skip when the stage's output exists."""
    if done.exists():
        logger.info("[%s] already built: %s", name, done)
        return False
    logger.info("[%s] building -> %s", name, done)
    return True


def _half_copy_model(src: Path, dst: Path) -> None:
    """A transformers model directory with fp16 weights (mmspec loads it back in the dtype it is asked for)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(str(src), dtype=torch.float16)
    dst.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(dst))
    AutoProcessor.from_pretrained(str(src)).save_pretrained(str(dst))


def _half_copy_drafter(src: Path, dst: Path, target: str = "mini-vlm") -> None:
    from safetensors.torch import load_file, save_file

    from mmspec.drafter import CONFIG_NAME, WEIGHTS_NAME

    dst.mkdir(parents=True, exist_ok=True)
    state = {k: v.half() if v.is_floating_point() else v for k, v in load_file(str(src / WEIGHTS_NAME)).items()}
    save_file(state, str(dst / WEIGHTS_NAME), metadata={"format": "pt"})
    config = json.loads((src / CONFIG_NAME).read_text())
    config.get("extra", {})["target"] = target  # a built-in name, not this machine's build path
    (dst / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def select_tasks(sources: list[tuple[Path, dict[str, float]]], dst: Path, seed: int) -> int:
    """Write to ``dst`` each line of each JSONL file with probability ``share[task]`` of its share dict, or
    ``share["task:answer"]`` where that key exists (seeded; one generator over all files). Returns the count kept.
    The files must share a directory: their image paths are relative to it."""
    g = torch.Generator().manual_seed(seed)
    kept = 0
    with open(dst, "w", encoding="utf-8") as out:
        for src, share in sources:
            with open(src, encoding="utf-8") as f:
                for line in f:
                    r = json.loads(line)
                    p = share.get(f"{r['task']}:{r['answer']}", share.get(r["task"], 0.0))
                    if torch.rand((), generator=g).item() < p:
                        out.write(line)
                        kept += 1
    return kept


def _export_vlm(work: Path, out: Path, assets: Path | None) -> None:
    """The shipped copies (fp16) of mini-vlm, its assistant and drafters, and the bundled sample scene."""
    from .shapes_world import render, sample_scene

    out.mkdir(parents=True, exist_ok=True)
    for name, copy in (("mini-vlm", _half_copy_model), ("mini-vlm-assistant", _half_copy_model),
                       ("mini-vlm-vispec", _half_copy_drafter), ("mini-vlm-eagle", _half_copy_drafter)):
        if (out / name).exists():
            shutil.rmtree(out / name)
        copy(work / name, out / name)
    if assets is not None:
        assets.mkdir(parents=True, exist_ok=True)
        render(sample_scene(torch.Generator().manual_seed(7), n_objects=3)).save(assets / "sample_scene.png")


class _Stages:
    """Times stages into ``info["stages_s"]`` (this invocation) and into work/stages.json, which keeps every
    invocation's stages with the device each ran on: a build resumed on another machine still reports them all."""

    def __init__(self, work: Path, info: dict, device: str) -> None:
        self.file, self.info, self.device = work / "stages.json", info, device

    def __call__(self, name: str, fn):
        t0 = time.perf_counter()
        result = fn()
        seconds = round(time.perf_counter() - t0, 1)
        self.info["stages_s"][name] = seconds
        record = json.loads(self.file.read_text()) if self.file.exists() else {}
        record[name] = {"s": seconds, "device": self.device}
        self.file.write_text(json.dumps(record, indent=1) + "\n")
        return result


def _train_stage(run: _Stages, name: str, out: Path, **kwargs) -> None:
    """One train_target stage whose metrics (losses, monitor, steps, device) are kept beside its model."""
    from .train_target import train_target

    metrics = run(name, lambda: train_target(out_dir=out, **kwargs))
    (out / "train_metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")


def _vlm_target(plan: BuildPlan, work: Path, run: _Stages) -> Path:
    """Training data, tokenizer, and mini-vlm's stages (vision warm-up and joint run, short answers, counting); the
    training sets are drawn only when a stage still has to train."""
    from .target_data import make_dataset_sharded
    from .tokenizer import conversation_texts, train_tokenizer
    from .train_target import TRAIN_TASKS, build_target

    data, tok = work / "data", work / "data" / "tokenizer"
    joint, qa, target = work / "mini-vlm-joint", work / "mini-vlm-qa", work / "mini-vlm"
    if (target / "model.safetensors").exists():
        logger.info("[target] already built: %s", target)
        return target
    minutes = plan.target_minutes or (None, None, None)
    # a GPU step takes milliseconds: logging (which reads the loss back) every 10 steps would slow it
    common = {"freeze_vision_tower": True, "monitor_data": data / "eval.jsonl",
              "monitor_describe": plan.monitor_describe, "log_every": 100 if torch.cuda.is_available() else 10}
    if _stage("data", data / "train.jsonl"):
        run("data", lambda: make_dataset_sharded(plan.n_train, data, plan.seed, TRAIN_TASKS, "train", plan.shards))
    if _stage("tokenizer", tok / "tokenizer.json"):
        run("tokenizer", lambda: train_tokenizer(conversation_texts(data / "train.jsonl"), tok))
    if _stage("target", joint / "model.safetensors"):
        build_target(tok, work / "mini-vlm-init", size=plan.target_size, seed=plan.seed)
        _train_stage(run, "target", joint, model_dir=work / "mini-vlm-init", data_jsonl=data / "train.jsonl",
                     steps=plan.target_steps, batch_size=plan.target_batch, lr=plan.target_lr, seed=plan.seed,
                     minutes=minutes[0],
                     vision_warmup_steps=plan.target_vision_steps, monitor_every=max(1, plan.target_steps // 8),
                     **common)
    if _stage("target-qa", qa / "model.safetensors"):
        select_tasks([(data / "train.jsonl", {**QA_SHARE, "describe": plan.qa_describe_share})], data / "qa.jsonl",
                     plan.seed)
        _train_stage(run, "target-qa", qa, model_dir=joint, data_jsonl=data / "qa.jsonl", steps=plan.qa_steps,
                     batch_size=plan.qa_batch or plan.target_batch, lr=plan.qa_lr, seed=plan.seed + 1,
                     per_example_loss=True, minutes=minutes[1], monitor_every=max(1, plan.qa_steps // 8), **common)
    if _stage("count-data", data / "count.jsonl"):
        run("count-data", lambda: make_dataset_sharded(plan.n_count, data, plan.seed + COUNT_SEED_OFFSET, ["count"],
                                                       "count", plan.shards))
    count = work / "mini-vlm-count"
    if _stage("target-count", count / "train_metrics.json"):
        mix, seed = data / "count_mix.jsonl", plan.seed + COUNT_SEED_OFFSET_TRAIN
        select_tasks([(data / "train.jsonl", {**COUNT_MIX_SHARE, "describe": plan.count_describe_share}),
                      (data / "count.jsonl", COUNT_SHARE)], mix, seed)
        _train_stage(run, "target-count", count, model_dir=qa, data_jsonl=mix, steps=plan.count_steps,
                     batch_size=plan.count_batch or plan.target_batch, lr=plan.count_lr, seed=seed,
                     per_example_loss=True, minutes=minutes[2], monitor_every=max(1, plan.count_steps // 6), **common)
    _promote(qa, count, target)
    return target


def _promote(qa: Path, count: Path, target: Path) -> None:
    """The counting stage first unlearns the short-answer stage's prior for "one" and dips before it counts better
    (docs/mini-models.md); cut short by a clock cap it can end in the dip. Its weights become the target only when
    they grade at least as well on the monitor (eval.jsonl's first 96 count and colour questions and the plan's
    monitor_describe descriptions, never test.jsonl) as the short-answer stage's; else those do. The target
    appears whole, by a rename, with train_metrics.json saying which weights it holds, so a build stopped half way
    never resumes from an unchecked target."""
    def last(d: Path) -> dict:
        return (json.loads((d / "train_metrics.json").read_text()).get("monitor") or [{}])[-1]

    before, after = last(qa), last(count)
    chosen = count if "overall" not in before or after.get("overall", 0.0) >= before["overall"] else qa
    logger.info("[target-count] monitor %s after the counting stage, %s before: the target is %s", after, before,
                chosen)
    metrics = json.loads((count / "train_metrics.json").read_text())
    metrics["kept"] = {"weights_of": chosen.name, "monitor_after_counting": after, "monitor_before": before}
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(count, staging)  # the processor files with the weights
    shutil.copy(chosen / "model.safetensors", staging / "model.safetensors")
    (staging / "train_metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    shutil.rmtree(target, ignore_errors=True)  # never a finished target: that one returned early above
    staging.rename(target)


def _vlm_grade(plan: BuildPlan, work: Path, target: Path, run: _Stages, info: dict) -> None:
    """Held-out grading (eval.jsonl steered the recipe, so the figure to quote is test.jsonl's, which no decision
    saw) and each decoder block's residual update on held-out conversations."""
    from .shapes_world import TASKS, make_dataset
    from .target_eval import evaluate_target, load_for_eval, residual_updates
    from .target_data import load_records

    data, gpu = work / "data", torch.cuda.is_available()
    for split, offset in (("eval", EVAL_SEED_OFFSET), ("test", TEST_SEED_OFFSET)):
        metrics_file = target / f"{split}_metrics.json"
        if _stage(f"target-{split}", metrics_file):
            if not (data / f"{split}.jsonl").exists():
                make_dataset(plan.n_eval, data, seed=plan.seed + offset, tasks=TASKS, split=split)
            evaluation = run(f"target-{split}", lambda: evaluate_target(
                target, data / f"{split}.jsonl", batch_size=128 if gpu else 16,
                predictions_out=target / f"{split}_predictions.jsonl"))
            metrics_file.write_text(json.dumps({split: evaluation}, indent=1) + "\n")
        info[f"target_{split}"] = json.loads(metrics_file.read_text())[split]
    residual_file = target / "residual_updates.json"
    if _stage("target-residuals", residual_file):
        model, processor = load_for_eval(target)
        records = load_records(data / "test.jsonl")[:RESIDUAL_RECORDS]
        updates = run("target-residuals", lambda: residual_updates(model, processor, records))
        residual_file.write_text(json.dumps(updates) + "\n")
    info["residual_updates"] = json.loads(residual_file.read_text())
    info["target_train"] = {name: _train_summary(work / name) for name in ("mini-vlm-joint", "mini-vlm-qa",
                                                                            "mini-vlm")}


def _train_summary(model_dir: Path) -> dict | None:
    f = model_dir / "train_metrics.json"
    if not f.exists():
        return None
    m = json.loads(f.read_text())
    keep = ("steps", "planned_steps", "minutes_cap", "device", "batch_size", "lr", "train_s", "s_per_step", "kept",
            "n_train_examples", "final_loss", "params")
    return {**{k: m.get(k) for k in keep}, "monitor": m.get("monitor")}


def _vlm_drafters(plan: BuildPlan, work: Path, target: Path, run: _Stages, info: dict) -> None:
    """The target's own answers to the drafter conversations, the two drafters trained on them, the assistant."""
    from mmspec.train import TrainConfig, train_drafter

    from .regenerate import regenerate
    from .train_target import build_target, train_target

    regen = work / "regenerated.jsonl"
    if _stage("regenerate", work / "regenerated.done"):
        run("regenerate", lambda: regenerate(str(target), work / "data" / "drafter.jsonl", regen, prompt_suffix="",
                                             max_new_tokens=plan.max_new_tokens, batch_size=32))
        (work / "regenerated.done").write_text("ok\n")
    drafters = {}
    for name, adaptor in (("mini-vlm-vispec", True), ("mini-vlm-eagle", False)):
        d = work / name
        if _stage(name, d / "model.safetensors"):
            cfg = TrainConfig(vision_adaptor=adaptor, max_steps=plan.drafter_steps, batch_size=plan.drafter_batch,
                              seed=plan.seed, eval_fraction=0.05, save_every=200,
                              lr=3e-3 if plan.size == "micro" else 1e-3)
            run(name, lambda: train_drafter(str(target), regen, d, cfg, device="cpu"))
        drafters[name] = json.loads((d / "training_metrics.json").read_text())["held_out"]
    info["drafters_held_out"] = drafters
    assistant = work / "mini-vlm-assistant"
    if _stage("assistant", assistant / "model.safetensors"):
        init = work / "mini-vlm-assistant-init"
        build_target(target, init, size="micro" if plan.size == "micro" else "assistant", seed=plan.seed)
        run("assistant", lambda: train_target(init, regen, assistant, steps=plan.assistant_steps,
                                              batch_size=32 if plan.size != "micro" else plan.target_batch,
                                              seed=plan.seed, device="cpu"))


def build(work: Path, out: Path, plan: BuildPlan, assets: Path | None = None,
          stop_after: str | None = None) -> dict:
    """Build the mini-vlm family into ``out``; ``stop_after="target"`` ends after the target is trained and graded
    (the part a GPU pays for; the rest resumes on any machine)."""
    from mmspec.hardware import describe_device, training_device

    from .shapes_world import TASKS, make_dataset
    from .train_target import TRAIN_TASKS

    torch.manual_seed(plan.seed)
    work.mkdir(parents=True, exist_ok=True)
    info: dict = {"plan": dataclasses.asdict(plan), "stages_s": {}}
    run = _Stages(work, info, describe_device(training_device()))
    data = work / "data"
    if _stage("eval-data", data / "eval.jsonl"):
        run("eval-data", lambda: make_dataset(plan.n_eval, data, seed=plan.seed + EVAL_SEED_OFFSET,
                                              tasks=TASKS, split="eval"))
    if _stage("drafter-data", data / "drafter.jsonl"):
        # describe-heavy: long answers are what speculative decoding speeds up, and what `mmspec bench` decodes
        run("drafter-data", lambda: make_dataset(plan.n_drafter, data, seed=plan.seed + DRAFTER_SEED_OFFSET,
                                                 tasks=["describe"] * 4 + list(TRAIN_TASKS), split="drafter"))
    target = _vlm_target(plan, work, run)
    _vlm_grade(plan, work, target, run, info)
    if stop_after == "target":
        return info
    _vlm_drafters(plan, work, target, run, info)
    _export_vlm(work, out, assets)
    info["stages"] = json.loads((work / "stages.json").read_text())
    info["sizes_mb"] = {p.name: round(sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) / 2**20, 2)
                        for p in sorted(out.iterdir()) if p.is_dir()}
    (out / "build_info.json").write_text(json.dumps(info, indent=2, default=str) + "\n")
    logger.info("built minis: %s", info["sizes_mb"])
    return info


DRAFTER_ROWS = 1  # set from the measurement in docs/image-generation.md


@dataclass(frozen=True)
class GenPlan:
    """mini-gen's build (docs/mini-gen.md): gen-world data -> tokenizer -> VQ -> generator -> export."""
    size: str = "mini"
    n_train: int = 20_000
    n_heldout: int = 512
    vq_steps: int = 12_000  # batch 32: ~0.3 s a step with bf16 autocast on 1 thread (AMX), ~0.55 s in fp32
    vq_batch: int = 32
    vq_minutes: float = 35.0  # wall-clock cap; the schedule follows whichever of steps and clock runs out first
    vq_lr: float = 2e-3
    vq_judge_images: int = 64  # held-out VQ reconstructions the mini-vlm judge checks (0: skip)
    gen_minutes: float = 65.0  # the generator trains to a wall-clock budget; its cosine schedule follows the clock
    gen_max_steps: int = 100_000
    gen_n_train: int = 16_000  # images encoded for the generator: encoding costs ~15 ms an image on 2 busy cores
    gen_batch: int = 32  # ~0.25 s a step with bf16 autocast on 2 free cores (AMX); 2.5-8 s on a busy AVX2 CPU
    gen_lr: float = 1e-3
    export_after_minutes: float = 15.0  # an early export, overwritten by the final one
    # stochastic re-quantisation of the training codes (train_gen.swap_codes): the code-level ambiguity LANTERN needs
    code_swap_p: float = 0.8
    code_swap_k: int = 8
    n_samples: int = 16  # images in docs/mini-gen-samples.png
    judge_prompts: int = 64  # held-out prompts generated for the top-1 probability and judged for faithfulness
    drafter_prompts: int = 2_000  # prompt lines mini-gen-drafter trains on (mini-gen draws each image once: cached)
    drafter_steps: int = 2_000
    drafter_rows: int = DRAFTER_ROWS
    base: str | None = None  # a deep build is up-scaled from a trained build of this plan (train_gen.upscale)
    init_from: str | None = None  # that build's mini-gen directory (set by build_gen: --init-from or work/base)
    seed: int = 0


GEN_PLANS = {
    "mini": GenPlan(),
    # Issue #23's deep mini-gen: 12 blocks on 16 x 16 codes of 64-px images, up-scaled from a trained mini-gen (its
    # VQ unchanged, its 4 blocks each followed by 2 identity-initialised copies), then trained on the finer images.
    # A batch-16 step costs ~0.95 s with bf16 autocast on 2 free Sapphire Rapids cores (batch 32: 1.8 s).
    "deep": GenPlan(size="deep", base="mini", n_train=12_000, vq_minutes=10.0, vq_lr=5e-4, vq_batch=16,
                    gen_n_train=12_000, gen_batch=16, gen_lr=6e-4,
                    gen_minutes=75.0, export_after_minutes=20.0, drafter_prompts=1_000, drafter_steps=1_500),
    "micro": GenPlan(size="micro", n_train=64, n_heldout=8, vq_steps=4, vq_batch=8, vq_judge_images=0,
                     judge_prompts=0, gen_minutes=0.2, gen_max_steps=6, gen_batch=8, gen_lr=3e-3,
                     export_after_minutes=0.0, n_samples=1, gen_n_train=64, drafter_prompts=8, drafter_steps=2),
}
# the deep path in a minute (the test suite runs it): micro up-scaled to 3 blocks on 64-px images
GEN_PLANS["micro-deep"] = dataclasses.replace(GEN_PLANS["micro"], size="micro-deep", base="micro")
# deep's recipe on mini's 4 blocks (a third of deep's cost a step): a stage towards deep that can ship on its own and
# that deep's up-scaling can start from (docs/mini-gen.md, "--size fine")
GEN_PLANS["fine"] = dataclasses.replace(GEN_PLANS["deep"], size="fine", gen_minutes=60.0)
GEN_PLANS["micro-fine"] = dataclasses.replace(GEN_PLANS["micro"], size="micro-fine", base="micro")
GEN_HELDOUT_SEED_OFFSET = 1_000_003
DRAFTER_MADE_FOR = "made_for.json"  # in the drafter's work dir: the generator step it was distilled from
GEN_ASSET_PROMPTS = 64


def build_gen(work: Path, out: Path, plan: GenPlan, assets: Path | None = None, samples_png: Path | None = None,
              stop_after: str | None = None, init_from: Path | None = None) -> dict:
    """Build mini-gen into out/mini-gen; every stage is skipped when its output exists in ``work``. A plan with a
    ``base`` is up-scaled from ``init_from`` (a trained mini-gen directory), or from a build of the base plan in
    work/base when none is given."""
    from .gen_world import make_gen_dataset
    from .gen_export import export_gen, finish_gen_export
    from .train_gen import (SIDECAR, SIZES, finetune_vq_stage, judge_vq_stage, run_vq_stage, train_gen_tokenizer,
                            train_generator)

    work.mkdir(parents=True, exist_ok=True)
    if plan.base is not None:
        if init_from is None:
            build_gen(work / "base", work / "base", GEN_PLANS[plan.base], stop_after="generator")
            init_from = work / "base" / "mini-gen"
        if not (init_from / SIDECAR).exists():
            raise FileNotFoundError(f"--init-from {init_from} is not a mini-gen directory (no {SIDECAR})")
        plan = dataclasses.replace(plan, init_from=str(init_from))
    px = SIZES[plan.size].image_px
    info: dict = {"plan": plan.__dict__, "stages_s": {}}

    def timed(name, fn):
        t0 = time.perf_counter()
        result = fn()
        info["stages_s"][name] = round(time.perf_counter() - t0, 1)
        return result

    data, tok, vq, gen = work / "data", work / "tokenizer", work / "vq", work / "generator"
    if _stage("gen-data", data / "heldout.jsonl"):
        timed("gen-data", lambda: (make_gen_dataset(plan.n_train, data, plan.seed, "train", px),
                                   make_gen_dataset(plan.n_heldout, data, plan.seed + GEN_HELDOUT_SEED_OFFSET,
                                                    "heldout", px)))
    if _stage("gen-tokenizer", tok / "tokenizer.json"):
        if plan.init_from:  # the up-scaled text embeddings need the base's tokenizer
            from transformers import AutoTokenizer
            AutoTokenizer.from_pretrained(plan.init_from).save_pretrained(str(tok))
        else:
            prompts = [json.loads(line)["prompt"] for line in open(data / "train.jsonl", encoding="utf-8")]
            timed("gen-tokenizer", lambda: train_gen_tokenizer(prompts, tok))
    if _stage("gen-vq", vq / "vq.pt"):
        if plan.init_from:
            timed("gen-vq", lambda: finetune_vq_stage(plan, data, tok, vq, Path(plan.init_from)))
        else:
            timed("gen-vq", lambda: run_vq_stage(plan, data, tok, vq))
    judge_vq_stage(plan, data, tok, vq)
    if stop_after == "vq":
        return info
    out_dir = out / "mini-gen"

    def export(model, extra):
        export_gen(model, tok, out_dir, {**info, **extra, "vq": json.loads((vq / "vq_metrics.json").read_text())})

    if _generator_due(gen, plan):
        timed("gen-generator", lambda: train_generator(plan, data, tok, vq, gen, export))
    info["generator"] = json.loads((gen / "done.json").read_text())
    info["vq"] = json.loads((vq / "vq_metrics.json").read_text())
    info["verify"] = finish_gen_export(gen, tok, out_dir, data / "heldout.jsonl", plan.n_samples, samples_png,
                                       {**info}, plan.judge_prompts)
    if stop_after == "generator":
        return info
    if _drafter_due(work / "drafter", info["generator"]["steps"]):
        timed("gen-drafter", lambda: _gen_drafter(plan, work, data, out_dir, info["generator"]["steps"]))
    _half_copy_drafter(work / "drafter", out / "mini-gen-drafter", "mini-gen")
    if assets is not None:
        assets.mkdir(parents=True, exist_ok=True)
        lines = open(data / "heldout.jsonl", encoding="utf-8").read().splitlines()[:GEN_ASSET_PROMPTS]
        records = [{"prompt": r["prompt"], "scene": r["scene"]} for r in map(json.loads, lines)]
        (assets / "gen_prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    logger.info("built mini-gen: %s", info["verify"])
    return info


def _generator_due(gen: Path, plan: GenPlan) -> bool:
    """Whether the generator stage runs: it has not finished, or it finished within a smaller budget than the plan's
    (a larger --gen-minutes continues a finished build from generator/ckpt.pt, a build spread over sessions; the
    cosine schedule follows the clock, so it restarts part-way down, a warm restart). The old verification goes."""
    done = gen / "done.json"
    if not done.exists():
        return _stage("gen-generator", done)
    record = json.loads(done.read_text())
    if record["steps"] >= plan.gen_max_steps or record["minutes"] >= plan.gen_minutes - 0.1:
        return _stage("gen-generator", done)
    from .train_gen import CKPT_NAME

    if not (gen / CKPT_NAME).exists():  # training would start over and overwrite the finished generator
        raise FileNotFoundError(f"cannot continue the {record['minutes']}-minute generator in {gen} to "
                                f"{plan.gen_minutes} minutes: its {CKPT_NAME} is gone; keep --gen-minutes at "
                                f"{record['minutes']} or build in a new --work")
    logger.info("[gen-generator] continuing a %.1f-minute generator to %.1f minutes", record["minutes"],
                plan.gen_minutes)
    done.unlink()
    (gen / "verify.json").unlink(missing_ok=True)
    return True


def _drafter_due(drafter: Path, generator_steps: int) -> bool:
    """Whether the drafter stage runs: no drafter yet, or one distilled from another state of the generator (which
    is kept beside it, renamed, and not resumed from)."""
    made_for = drafter / DRAFTER_MADE_FOR
    if (drafter / "model.safetensors").exists() and made_for.exists():
        old = json.loads(made_for.read_text())["generator_steps"]
        if old != generator_steps:
            stale = drafter.with_name(f"{drafter.name}-for-generator-step-{old}")
            logger.info("[gen-drafter] the drafter was made for generator step %d, not %d: moved to %s", old,
                        generator_steps, stale)
            drafter.rename(stale)
    return _stage("gen-drafter", drafter / "model.safetensors")


def _gen_drafter(plan: GenPlan, work: Path, data: Path, gen_dir: Path, generator_steps: int) -> None:
    """mini-gen-drafter: `train-drafter` on prompt lines, mini-gen drawing its own images (self-distillation).
    docs/image-generation.md has the cond-row vs both-rows measurement behind draft_rows."""
    from mmspec.train import TrainConfig, train_drafter

    prompts = work / "drafter_prompts.jsonl"
    lines = open(data / "train_prompts.jsonl", encoding="utf-8").read().splitlines()[: plan.drafter_prompts]
    prompts.write_text("\n".join(lines) + "\n")
    train_drafter(str(gen_dir), prompts, work / "drafter", TrainConfig(
        vision_adaptor=False, max_steps=plan.drafter_steps, batch_size=8, lr=1e-3, seed=plan.seed,
        draft_rows=plan.drafter_rows))
    (work / "drafter" / DRAFTER_MADE_FOR).write_text(json.dumps({"generator_steps": generator_steps}) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mmspec.data_tools.build_minis", description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=Path("runs/build_minis"), help="intermediate files (resumable)")
    p.add_argument("--out", type=Path, default=PACKAGE / "models", help="where the fp16 models go")
    p.add_argument("--assets", type=Path, default=PACKAGE / "assets")
    p.add_argument("--size", choices=sorted(set(PLANS) | set(GEN_PLANS)), default="mini",
                   help=f"mini-vlm: {', '.join(PLANS)}; mini-gen: {', '.join(GEN_PLANS)}")
    p.add_argument("--only", choices=["vlm", "gen"], default="vlm",
                   help="vlm: the mini-vlm family (default); gen: mini-gen, the image generator")
    p.add_argument("--gen-minutes", type=float, help="mini-gen: the generator's wall-clock training budget")
    p.add_argument("--gen-batch", type=int, help="mini-gen: the generator's batch (a GPU wants more than the plan's)")
    p.add_argument("--vq-minutes", type=float, help="mini-gen: the VQ's wall-clock training budget")
    p.add_argument("--stop-after", choices=["vq", "generator", "target"],
                   help="stop after this stage (vq / generator: mini-gen's; target: mini-vlm trained and graded)")
    p.add_argument("--init-from", type=Path, help="--only gen --size deep: the trained mini-gen to up-scale "
                   "(default: build one in WORK/base first)")
    p.add_argument("--target-minutes", type=float, nargs=3, metavar=("JOINT", "QA", "COUNT"),
                   help="mini-vlm: wall-clock caps of its three decoder stages (the schedule follows the clock)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        plans = GEN_PLANS if args.only == "gen" else PLANS
        if args.size not in plans:
            raise ValueError(f"--size {args.size} is not a {'mini-gen' if args.only == 'gen' else 'mini-vlm'} "
                             f"plan; choose one of {', '.join(plans)}")
        if args.only == "gen":
            plan = GEN_PLANS[args.size]
            overrides = {"gen_minutes": args.gen_minutes, "gen_batch": args.gen_batch, "vq_minutes": args.vq_minutes}
            plan = dataclasses.replace(plan, **{k: v for k, v in overrides.items() if v is not None})
            # the docs' sample grid belongs to the shipped build; any other --out keeps its grid beside the model
            shipped = args.out.resolve() == (PACKAGE / "models").resolve()
            samples = PACKAGE.parent / "docs" / "mini-gen-samples.png" if shipped else args.out / "mini-gen-samples.png"
            samples = None if args.size.startswith("micro") else samples
            build_gen(args.work, args.out, plan, args.assets, samples, args.stop_after, args.init_from)
        else:
            plan = PLANS[args.size]
            if args.target_minutes is not None:
                plan = dataclasses.replace(plan, target_minutes=tuple(args.target_minutes))
            build(args.work, args.out, plan, args.assets, args.stop_after)
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"build_minis: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
