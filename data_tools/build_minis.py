"""Rebuild every built-in mini model from nothing: `python -m mmspec.data_tools.build_minis`.

    shapes-world data -> tokenizer -> mini-vlm (vision warm-up, joint run, short-answer and counting stages)
      -> mini-vlm's own answers (regenerate)
      -> mini-vlm-vispec + mini-vlm-eagle (train-drafter, same data and steps) -> mini-vlm-assistant (distilled)
      -> fp16 safetensors under mmspec/models/, a sample scene under mmspec/assets/, build_info.json

Every stage is seeded and skipped when its output already exists in --work, so an interrupted build resumes. The
default sizes take about 1.6 hours on a 2-core CPU (see BuildPlan); --size micro runs the whole path in a minute
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
    # Where the time goes (2-core CPU, unshared): data 1 min, warm-up 4, joint 38, short-answer 18, counting 25,
    # grading, regeneration, drafters and assistant 9 min. Training is compute-bound (100-200 GFLOP/s in bf16), so only
    # fewer steps would make it faster, and they cost accuracy: a full build with 1400 joint, 1000 short-answer and
    # 1200 counting steps took 68 min but ended at count 70 % (test.jsonl 60 %), colour 97 %; the full 1800 counting
    # steps from its short-answer model still gave 71 % (shape 78 %, position 80 %): the long joint run is the key.
    # Two more pilots that failed the 95 % counting bar: batch 16 in every stage (same steps, ~62 min in all) ended
    # at count 49 %, shape 76 % (its joint run matched batch 32's, its two question stages did not: counting wants
    # examples, not steps); a single stage of 3200 steps on all tasks plus the balanced fresh count questions (40 %
    # of the mix), every answer weighing the same (~65 min), stood at count 39 %, colour 60 % after 2400 steps: the
    # token-weighted descriptions of the joint run are what teach the decoder to bind a question to its object.
    # Merging the two question stages into one (the short-answer mix plus the balanced fresh counts, 55 % count,
    # lr 5e-4, from the joint model; it would save ~16 min) held count at 67 / 58 / 58 % after 300 / 600 / 900 of
    # 1800 steps (colour 90 %), where the two stages in turn reach 81 % and then 92 % by 900 counting steps. A
    # counting stage on multi-turn conversations (2.3 count questions per scene, the image read once; a step costs
    # 1.35x) stood at 45 / 36 / 55 % after 100 / 200 / 300 steps, where the single-question stage had 71 % at 300.
    # And torch.compile (inductor) makes a training step only ~6 % faster after a 2-minute compile.
    # Cheaper steps instead of fewer: 20-px patches (9 image tokens, one per grid cell; the full plan would take
    # ~65-70 min) matched the joint run (count/colour 82 / 65 %) but the short-answer stage ended at 79 / 92 % (36
    # tokens: 85 / 97 %) and the counting stage fell to count 36 % at steps 900 and 1200 (colour 97 %): with one
    # token per object the decoder reads colours but does not learn to count in the same steps.
    # Counts in every image token: a probe head reading, from each token, how many objects of each shape, of each
    # colour and in all the image holds (1200 warm-up steps, the ViT then gets 88-95 % of tokens' counts all right),
    # then 1400 / 1000 / 600 steps (~75 min in all): count 79 % after the joint run, 85 % after the short-answer
    # stage, and the counting stage fell to 48-67 % (final count 68 % eval / 60 % test, colour 95 %): a decoder from
    # scratch does not learn to pick the asked attribute's count out of a token any faster than to count.
    # A 256-wide decoder (8.8 M parameters) makes a step only 1.36x cheaper (0.70 vs 0.95 s: attention, norms and the
    # frozen tower do not shrink with the width), so the steps counting needs would still take ~70 min.
    # Eager attention in training: a step 17 % faster than sdpa on the same 16 batches (833 vs 1007 ms, sdpa's CPU
    # attention backward costs ~18 ms a layer at 60 tokens), but a full build with it was not finished (its joint
    # run took 33 min, count/colour 76 / 92 %), so the recipe that met the bars keeps sdpa until one is.
    target_steps: int = 2_400
    target_batch: int = 32
    target_lr: float = 1e-3
    qa_steps: int = 1_200  # then short answers only, each answer weighing the same (see QA_SHARE)
    qa_lr: float = 5e-4
    n_count: int = 30_000  # fresh count questions for the counting stage (see COUNT_SHARE)
    count_steps: int = 1_800
    count_lr: float = 3e-4
    # Drafters train briefly: with 2000 conversations and 1000 steps eagle's bench tau rose from 4.0 to 4.3 but
    # vispec's stayed at ~4.5, so the adaptor's edge (tau 1.1x eagle's) is mostly faster learning on this world.
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
# The share of each task's training conversations the short-answer stage keeps. After the joint run mini-vlm reads
# the scene (shape answers 79 %) but binds a question to its object only ~70 % of the time, gaining ~5 points per
# 300 joint steps. 1200 steps mostly on count and colour questions, every answer weighing the same, took held-out
# colour from 70 to 97 % and count from 69 to 81 % (300 further count-heavy steps left count at ~78 %: it finds
# the object but says "one" for zero, two or three matches: 55 % of count answers are "one"), hence the counting
# stage after it. A few descriptions and the other tasks stay in so the long answers the drafters learn from are
# not forgotten.
QA_SHARE = {"count": 1.0, "colour": 1.0, "shape": 0.3, "position": 0.3, "yesno": 0.5, "compare": 0.5,
            "describe": 0.1}
# The counting stage: 30k fresh count questions with the answer "1" kept at a quarter, so the answers 0-4 are
# about equally likely and "one" stops paying, mixed with part of the other tasks so colour and the long answers
# hold. The same balancing on train.jsonl's own count questions (4.8k kept, 39 % of the mix) reached 80 % after
# 900 steps; 18k fresh ones (71 % of the mix) reached 92 % at step 900 and 97 % at 1800. Keeping the vision tower
# trainable here was worse (86 % at step 900, colour 91 %).
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
