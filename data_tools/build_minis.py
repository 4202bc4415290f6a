"""Rebuild every built-in mini model from nothing: `python -m mmspec.data_tools.build_minis`.

    shapes-world data -> tokenizer -> mini-vlm (vision warm-up, joint run, short-answer and counting stages)
      -> mini-vlm's own answers (regenerate)
      -> mini-vlm-vispec + mini-vlm-eagle (train-drafter, same data and steps) -> mini-vlm-assistant (distilled)
      -> fp16 safetensors under mmspec/models/, a sample scene under mmspec/assets/, build_info.json

Every stage is seeded and skipped when its output already exists in --work, so an interrupted build resumes. The
default sizes take about 1.6 hours on a 2-core CPU (docs/mini-models.md: where the time goes, and the pilots
behind the recipe); --size micro runs the whole path in a minute
(the test suite does).
"""

from __future__ import annotations

import argparse
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
    n_train: int = 40_000
    n_eval: int = 700
    n_drafter: int = 700  # conversations the target re-answers for drafter and assistant training
    target_vision_steps: int = 700  # vision-only warm-up of mini-vlm's tower on the scene labels (then frozen)
    # The recipe: a vision warm-up stands in for a pretrained CLIP; then, tower frozen, a long joint run whose
    # token-weighted descriptions teach the decoder to bind a question to its object, a short-answer stage and a
    # counting stage (both weighing every answer the same) that lift colour and count past the 95 % bars. ~95 min,
    # compute-bound, and every shorter or cheaper variant piloted so far counted worse: docs/mini-models.md has them
    # all (change, minutes, accuracies, verdict), so check there before trying another.
    target_steps: int = 2_400
    target_batch: int = 32
    target_lr: float = 1e-3
    qa_steps: int = 1_200  # then short answers only, each answer weighing the same (see QA_SHARE)
    qa_lr: float = 5e-4
    n_count: int = 30_000  # fresh count questions for the counting stage (see COUNT_SHARE)
    count_steps: int = 1_800
    count_lr: float = 3e-4
    # Drafters train briefly: longer runs lifted eagle's tau but not vispec's (docs/mini-models.md).
    drafter_steps: int = 400
    drafter_batch: int = 8
    assistant_steps: int = 300
    max_new_tokens: int = 150
    seed: int = 0


PLANS = {
    "mini": BuildPlan(),
    "micro": BuildPlan(size="micro", n_train=48, n_eval=8, n_drafter=12, target_vision_steps=3, target_steps=6,
                       # a stronger short-answer step teaches the micro model to stop at once (empty answers)
                       target_batch=8, qa_steps=3, qa_lr=1e-5, n_count=16, count_steps=3, count_lr=1e-5,
                       drafter_steps=3, drafter_batch=4, assistant_steps=3, max_new_tokens=24),
}
# The share of each task's training conversations the short-answer stage keeps: mostly count and colour, the
# questions the joint run leaves the decoder binding to the wrong object; a few descriptions and the other tasks stay
# in so the long answers the drafters learn from are not forgotten.
QA_SHARE = {"count": 1.0, "colour": 1.0, "shape": 0.3, "position": 0.3, "yesno": 0.5, "compare": 0.5,
            "describe": 0.1}
# The counting stage: fresh count questions with the answer "1" kept at a quarter, so the answers 0-4 are about
# equally likely and answering "one" (the short-answer stage's prior) stops paying, mixed with part of the other
# tasks so colour and the long answers hold. Fresh scenes counted better than re-balancing train.jsonl's own count
# questions, and the tower stays frozen here too (docs/mini-models.md).
COUNT_SHARE = {"count": 1.0, "count:1": 0.25}
COUNT_MIX_SHARE = {"colour": 0.5, "shape": 0.15, "position": 0.15, "yesno": 0.25, "compare": 0.25, "describe": 0.05}
COUNT_SEED_OFFSET = 1_234
COUNT_SEED_OFFSET_TRAIN = 5
# held-out scenes get a seed far from the training ones (the same offset `train_target`'s CLI uses)
EVAL_SEED_OFFSET = 1_000_003
TEST_SEED_OFFSET = 2_000_003
DRAFTER_SEED_OFFSET = 7


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


def _half_copy_drafter(src: Path, dst: Path) -> None:
    from safetensors.torch import load_file, save_file

    from mmspec.drafter import CONFIG_NAME, WEIGHTS_NAME

    dst.mkdir(parents=True, exist_ok=True)
    state = {k: v.half() if v.is_floating_point() else v for k, v in load_file(str(src / WEIGHTS_NAME)).items()}
    save_file(state, str(dst / WEIGHTS_NAME), metadata={"format": "pt"})
    config = json.loads((src / CONFIG_NAME).read_text())
    config.get("extra", {})["target"] = "mini-vlm"  # a built-in name, not this machine's build path
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


def build(work: Path, out: Path, plan: BuildPlan, assets: Path | None = None) -> dict:
    from mmspec.train import TrainConfig, train_drafter

    from .regenerate import regenerate
    from .shapes_world import make_dataset, render, sample_scene
    from .tokenizer import conversation_texts, train_tokenizer
    from .shapes_world import TASKS
    from .train_target import TRAIN_TASKS, build_target, evaluate_target, train_target

    torch.manual_seed(plan.seed)
    work.mkdir(parents=True, exist_ok=True)
    info: dict = {"plan": plan.__dict__, "stages_s": {}}
    t_all = time.perf_counter()

    def timed(name, fn):
        t0 = time.perf_counter()
        result = fn()
        info["stages_s"][name] = round(time.perf_counter() - t0, 1)
        return result

    data = work / "data"
    if _stage("data", data / "eval.jsonl"):
        timed("data", lambda: (make_dataset(plan.n_train, data, seed=plan.seed, tasks=TRAIN_TASKS, split="train"),
                               make_dataset(plan.n_eval, data, seed=plan.seed + EVAL_SEED_OFFSET, tasks=TASKS, split="eval")))
    if _stage("drafter-data", data / "drafter.jsonl"):
        # describe-heavy: long answers are what speculative decoding speeds up, and what `mmspec bench` decodes
        timed("drafter-data", lambda: make_dataset(plan.n_drafter, data, seed=plan.seed + DRAFTER_SEED_OFFSET,
                                                   tasks=["describe"] * 4 + list(TRAIN_TASKS), split="drafter"))
    tok = data / "tokenizer"
    if _stage("tokenizer", tok / "tokenizer.json"):
        timed("tokenizer", lambda: train_tokenizer(conversation_texts(data / "train.jsonl"), tok))

    joint, qa, target = work / "mini-vlm-joint", work / "mini-vlm-qa", work / "mini-vlm"
    if _stage("target", joint / "model.safetensors"):
        init = work / "mini-vlm-init"
        build_target(tok, init, size=plan.size, seed=plan.seed)
        info["target_train"] = timed("target", lambda: train_target(init, data / "train.jsonl", joint,
                                                                     steps=plan.target_steps, batch_size=plan.target_batch,
                                                                     lr=plan.target_lr, seed=plan.seed,
                                                                     vision_warmup_steps=plan.target_vision_steps,
                                                                     freeze_vision_tower=True,
                                                                     monitor_data=data / "eval.jsonl",
                                                                     monitor_every=max(1, plan.target_steps // 8)))
    if _stage("target-qa", qa / "model.safetensors"):
        select_tasks([(data / "train.jsonl", QA_SHARE)], data / "qa.jsonl", plan.seed)
        info["target_qa"] = timed("target-qa", lambda: train_target(joint, data / "qa.jsonl", qa,
                                                                    steps=plan.qa_steps, batch_size=plan.target_batch,
                                                                    lr=plan.qa_lr, seed=plan.seed + 1,
                                                                    freeze_vision_tower=True, per_example_loss=True,
                                                                    monitor_data=data / "eval.jsonl",
                                                                    monitor_every=max(1, plan.qa_steps // 8)))
    if _stage("count-data", data / "count.jsonl"):
        timed("count-data", lambda: make_dataset(plan.n_count, data, seed=plan.seed + COUNT_SEED_OFFSET,
                                                 tasks=["count"], split="count"))
    if _stage("target-count", target / "model.safetensors"):
        mix, seed = data / "count_mix.jsonl", plan.seed + COUNT_SEED_OFFSET_TRAIN
        select_tasks([(data / "train.jsonl", COUNT_MIX_SHARE), (data / "count.jsonl", COUNT_SHARE)], mix, seed)
        info["target_count"] = timed("target-count", lambda: train_target(qa, mix, target, steps=plan.count_steps,
                                                                          batch_size=plan.target_batch,
                                                                          lr=plan.count_lr, seed=seed,
                                                                          freeze_vision_tower=True,
                                                                          per_example_loss=True,
                                                                          monitor_data=data / "eval.jsonl",
                                                                          monitor_every=max(1, plan.count_steps // 6)))
    metrics_file = target / "metrics.json"
    if _stage("target-eval", metrics_file):
        evaluation = timed("target-eval", lambda: evaluate_target(target, data / "eval.jsonl"))
        metrics_file.write_text(json.dumps({"eval": evaluation}, indent=1) + "\n")
    info["target_eval"] = json.loads(metrics_file.read_text())["eval"]
    # eval.jsonl steered the recipe (its count/colour questions are the stages' monitor), so the figure to quote
    # comes from scenes no decision ever saw.
    test_file = target / "test_metrics.json"
    if _stage("target-test", test_file):
        make_dataset(plan.n_eval, data, seed=plan.seed + TEST_SEED_OFFSET, tasks=TASKS, split="test")
        evaluation = timed("target-test", lambda: evaluate_target(target, data / "test.jsonl"))
        test_file.write_text(json.dumps({"test": evaluation}, indent=1) + "\n")
    info["target_test"] = json.loads(test_file.read_text())["test"]

    regen = work / "regenerated.jsonl"
    if _stage("regenerate", work / "regenerated.done"):
        timed("regenerate", lambda: regenerate(str(target), data / "drafter.jsonl", regen, prompt_suffix="",
                                               max_new_tokens=plan.max_new_tokens, batch_size=32))
        (work / "regenerated.done").write_text("ok\n")

    drafters = {}
    for name, adaptor in (("mini-vlm-vispec", True), ("mini-vlm-eagle", False)):
        d = work / name
        if _stage(name, d / "model.safetensors"):
            cfg = TrainConfig(vision_adaptor=adaptor, max_steps=plan.drafter_steps, batch_size=plan.drafter_batch,
                              seed=plan.seed, eval_fraction=0.05, save_every=200, lr=1e-3 if plan.size == "mini" else 3e-3)
            timed(name, lambda: train_drafter(str(target), regen, d, cfg, device="cpu"))
        drafters[name] = json.loads((d / "training_metrics.json").read_text())["held_out"]
    info["drafters_held_out"] = drafters

    assistant = work / "mini-vlm-assistant"
    if _stage("assistant", assistant / "model.safetensors"):
        init = work / "mini-vlm-assistant-init"
        build_target(tok, init, size="assistant" if plan.size == "mini" else "micro", seed=plan.seed)
        timed("assistant", lambda: train_target(init, regen, assistant, steps=plan.assistant_steps,
                                                batch_size=plan.target_batch, seed=plan.seed))

    out.mkdir(parents=True, exist_ok=True)
    for name in ("mini-vlm", "mini-vlm-assistant"):
        if (out / name).exists():
            shutil.rmtree(out / name)
        _half_copy_model(work / name, out / name)
    for name in ("mini-vlm-vispec", "mini-vlm-eagle"):
        if (out / name).exists():
            shutil.rmtree(out / name)
        _half_copy_drafter(work / name, out / name)
    if assets is not None:
        assets.mkdir(parents=True, exist_ok=True)
        render(sample_scene(torch.Generator().manual_seed(7), n_objects=3)).save(assets / "sample_scene.png")
    info["total_s"] = round(time.perf_counter() - t_all, 1)
    info["sizes_mb"] = {p.name: round(sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) / 2**20, 2)
                        for p in sorted(out.iterdir()) if p.is_dir()}
    (out / "build_info.json").write_text(json.dumps(info, indent=2, default=str) + "\n")
    logger.info("built minis in %.0f s: %s", info["total_s"], info["sizes_mb"])
    return info


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mmspec.data_tools.build_minis", description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=Path("runs/build_minis"), help="intermediate files (resumable)")
    p.add_argument("--out", type=Path, default=PACKAGE / "models", help="where the fp16 models go")
    p.add_argument("--assets", type=Path, default=PACKAGE / "assets")
    p.add_argument("--size", choices=sorted(PLANS), default="mini")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        build(args.work, args.out, PLANS[args.size], args.assets)
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"build_minis: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
