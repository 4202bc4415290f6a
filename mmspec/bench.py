"""`mmspec bench`: autoregressive vs transformers' assisted generation vs EAGLE vs ViSpec on held-out prompts.

Fairness on a noisy machine: every method is warmed up once, then the methods take turns prompt by prompt (round-robin),
so a slow patch of the machine hits all of them alike. tau (mean accepted) counts every target forward, the prefill
included, for every method alike: for hf_assisted through a forward hook on the target.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from .config import AutoTreeConfig, TreeConfig
from .errors import InputError
from .registry import BUILTIN_TARGETS

logger = logging.getLogger(__name__)

METHODS = ("autoregressive", "hf_generate", "hf_assisted", "eagle", "vispec")
DRAFTERS = {"mini-vlm": {"eagle": "mini-vlm-eagle", "vispec": "mini-vlm-vispec"}}
ASSISTANTS = {"mini-vlm": "mini-vlm-assistant"}
HELD_OUT_SEED = 20_261_122  # never used for training data (build_minis uses small seeds)


@dataclass
class MethodResult:
    """One method's (or image setting's) totals over the bench's prompts; both benches keep this one record."""

    tokens: list[list[int]] = field(default_factory=list)  # per prompt: the new tokens (an image's codes)
    new_tokens: int = 0
    target_forwards: int = 0
    wall_s: float = 0.0
    peak_mem_mb: float = 0.0
    split_s: dict = field(default_factory=dict)  # engine methods: prefill / draft / verify / other seconds
    host_syncs_per_step: float | None = None  # engine methods: count_host_syncs of one run per target forward

    def add(self, token_ids: list[int], wall_s: float, target_forwards: int, stats=None) -> None:
        """One prompt's run; `stats` (mmspec's Stats, engine methods only) adds where the time went."""
        self.tokens.append(token_ids)
        self.new_tokens += len(token_ids)
        self.target_forwards += target_forwards
        self.wall_s += wall_s
        if stats is not None:
            for k, v in (("prefill", stats.prefill_s), ("draft", stats.draft_s), ("verify", stats.verify_s),
                         ("other", stats.other_s)):
                self.split_s[k] = self.split_s.get(k, 0.0) + v

    @property
    def speed(self) -> float:
        return self.new_tokens / self.wall_s


HOST_READS = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__")  # a tensor's value to the host


@contextlib.contextmanager
def count_host_syncs():
    """Counts every read of a tensor's value by the host (Tensor.item, tolist, cpu, float(t), int(t), bool(t), ...)
    while the block runs: on a GPU each is a device sync that stalls the queue of kernels, so the engine should make a
    small fixed number per step, whatever the tree. Yields a dict whose "n" is the count. On a CPU the same reads are
    counted (they are what would sync on a GPU). Patches torch.Tensor for the block: not for concurrent use."""
    counter = {"n": 0}
    originals = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def counting(original):
        def read(self, *args, **kwargs):
            counter["n"] += 1
            return original(self, *args, **kwargs)
        return read

    for name, original in originals.items():
        setattr(torch.Tensor, name, counting(original))
    try:
        yield counter
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def machine(device) -> str:
    """The hardware a bench ran on, for its JSON: speed figures from different CPUs are not comparable (bf16 is native
    on AVX512-BF16 / AMX CPUs, emulated on AVX2 ones)."""
    from .hardware import cpu_native_bf16, describe_device

    device = torch.device(device)
    if device.type == "cuda":
        return describe_device(device)
    return f"{describe_device(device)}, {'native' if cpu_native_bf16() else 'no native'} bf16"


def take_turns(names: list, n: int, run: Callable[[object, int], None], warm_up: Callable[[object], None]) -> None:
    """Warm every method up once (first-call allocations and lazy inits off the clock), then run item k of n for every
    method, the methods taking turns and the first of them rotating with k, so a slow patch of a noisy machine hits
    all alike. Both benches and the CLI's --compare time this way."""
    for name in names:
        warm_up(name)
    for k in range(n):
        for name in names[k % len(names):] + names[: k % len(names)]:
            run(name, k)


def held_out_prompts(n: int, seed: int = HELD_OUT_SEED) -> list[tuple[str, list]]:
    """(prompt, images) pairs from fresh shapes-world scenes: long detailed descriptions, the mini models' main job."""
    from .data_tools.shapes_world import make_example, render, sample_scene

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        scene = sample_scene(g)
        ex = make_example(scene, "describe", g)
        out.append((ex["messages"][0]["content"], [render(scene)]))
    return out


class PeakMemory:
    """Peak memory while a method runs: CUDA's allocator peak on a GPU, else the process RSS sampled every millisecond
    (minus the RSS before the bench loop, so it shows what the method adds on top of the loaded weights)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.baseline = self._rss()
        self.peak = 0.0
        self._stop = threading.Event()

    @staticmethod
    def _rss() -> float:
        import psutil

        return psutil.Process(os.getpid()).memory_info().rss / 2**20

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss() - self.baseline)
            time.sleep(0.001)

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            self.peak = max(self.peak, torch.cuda.max_memory_allocated(self.device) / 2**20)
        else:
            self._stop.set()
            self._thread.join()


def load_drafter_pipes(target: str, methods: list[str], dev: torch.device, dtype, tree: TreeConfig,
                       draft_dtype) -> dict:
    """{"vispec": pipeline, "eagle": pipeline sharing its target (when asked for)}. Under `auto` each drafter gets
    its own measured shape; both run in one dtype, so the ablation is the adaptor, not the dtype."""
    from . import load
    from .drafter import Drafter
    from .pipeline import Pipeline
    from .registry import resolve_dir

    pipes = {"vispec": load(target, DRAFTERS[target]["vispec"], device=dev, dtype=dtype, tree=tree,
                            draft_dtype=draft_dtype)}
    base = pipes["vispec"]
    if "eagle" in methods:
        eagle = Drafter.from_pretrained(resolve_dir(DRAFTERS[target]["eagle"], "drafter"), target=base.target)
        eagle.to(device=base.device, dtype=next(base.drafter.parameters()).dtype).eval()
        pipes["eagle"] = Pipeline(base.target, base.processor, base.adapter, eagle, tree)
        if isinstance(tree, AutoTreeConfig):
            from .autotune import auto_tree

            pipes["eagle"].tree = auto_tree(pipes["eagle"], f"{target} + {DRAFTERS[target]['eagle']}")
    return pipes


def run_bench(target: str = "mini-vlm", *, n: int = 8, max_new_tokens: int = 128, temperature: float = 0.0,
              device: str | None = None, dtype: str | None = None, tree_preset: str | None = None,
              methods: list[str] | None = None, seed: int = 0, draft_dtype: str | None = None) -> dict:
    from .pipeline import load_target

    if target not in BUILTIN_TARGETS:
        raise InputError(f"mmspec bench runs on the built-in targets ({', '.join(BUILTIN_TARGETS)}), whose drafters and "
                         f"assistant ship with mmspec; got {target!r}")
    methods = list(methods or METHODS)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise InputError(f"unknown bench method(s) {unknown}; choose from {', '.join(METHODS)}")
    if "autoregressive" not in methods:
        methods.insert(0, "autoregressive")  # the reference for speedup and lossless
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    pipes = load_drafter_pipes(target, methods, dev, dtype, TreeConfig.preset(tree_preset or "auto"), draft_dtype)
    base = pipes["vispec"]
    draft_dt = next(base.drafter.parameters()).dtype
    assistant = None
    if "hf_assisted" in methods:
        assistant, _, _ = load_target(ASSISTANTS[target], device=dev, dtype=base.target.dtype)
    prompts = held_out_prompts(n)

    forwards = {"n": 0}
    hook = base.target.register_forward_pre_hook(lambda *_: forwards.__setitem__("n", forwards["n"] + 1))
    sampling = dict(temperature=temperature, max_new_tokens=max_new_tokens)

    def run(method: str, prompt: str, images, k: int) -> tuple[list[int], float, int, object]:
        forwards["n"] = 0
        s = seed + k
        if method in ("hf_generate", "hf_assisted"):  # transformers' own generate: the honest baselines
            inputs = base.prepare(prompt, images)
            kw = dict(do_sample=temperature > 0, max_new_tokens=max_new_tokens)
            if temperature > 0:
                kw.update(temperature=temperature, top_k=0, top_p=1.0)
                torch.manual_seed(s)  # transformers samples from the global generator
            if method == "hf_assisted":
                kw["assistant_model"] = assistant
            t0 = time.perf_counter()
            out = base.target.generate(**inputs, **kw)
            wall = time.perf_counter() - t0
            return out[0, inputs["input_ids"].shape[1]:].tolist(), wall, forwards["n"], None
        pipe = base if method == "autoregressive" else pipes[method]
        res = pipe.generate(prompt, images, speculative=method != "autoregressive", seed=s, **sampling)
        return res.token_ids, res.stats.wall_s, forwards["n"], res.stats

    results = {m: MethodResult() for m in methods}
    mem: dict[str, PeakMemory] = {}  # made at a method's first timed run: its baseline is after every warm-up

    def timed(m: str, k: int) -> None:
        with mem.setdefault(m, PeakMemory(base.device)):
            out = run(m, *prompts[k], k)
        results[m].add(*out)

    try:
        with torch.inference_mode():
            take_turns(methods, len(prompts), timed, lambda m: run(m, *prompts[0], 0))
            for m in methods:
                results[m].peak_mem_mb = mem[m].peak
                if m not in ("hf_generate", "hf_assisted"):  # one more, untimed run: how often the host waits
                    with count_host_syncs() as syncs:
                        fw = run(m, *prompts[0], 0)[2]
                    results[m].host_syncs_per_step = round(syncs["n"] / max(fw, 1), 2)
    finally:
        hook.remove()

    header = {"target": target, "device": str(base.device), "hardware": machine(base.device), "n_prompts": n,
              "max_new_tokens": max_new_tokens, "temperature": temperature, "tree": asdict(base.tree),
              "dtype": str(base.target.dtype).removeprefix("torch."),
              "draft_dtype": str(draft_dt).removeprefix("torch.")}
    report = {**header, "methods": method_rows(results, greedy=temperature == 0)}
    for m in ("eagle", "vispec"):  # each drafter's own shape (tuned apart under `auto`)
        if m in results:
            report["methods"][m]["tree"] = asdict(pipes[m].tree)
    print_table(report)
    return report


def method_rows(results: dict[str, MethodResult], greedy: bool) -> dict[str, dict]:
    """The JSON's per-method figures; speedup and lossless against `autoregressive` on the same prompts."""
    ref = results["autoregressive"]
    ref_speed = ref.new_tokens / ref.wall_s
    rows = {}
    for m, r in results.items():
        speed = r.new_tokens / r.wall_s
        rows[m] = {
            "tokens_per_s": round(speed, 2),
            "mean_accepted": round(r.new_tokens / max(r.target_forwards, 1), 3),
            "speedup": round(speed / ref_speed, 3),
            "lossless": (r.tokens == ref.tokens) if greedy else None,
            "peak_mem_mb": round(r.peak_mem_mb, 1),
            "new_tokens": r.new_tokens,
            "target_forwards": r.target_forwards,
            "host_syncs_per_step": r.host_syncs_per_step,
        }
        if r.split_s:  # where a step's time goes: per target forward, in milliseconds
            steps = max(r.target_forwards, 1)
            rows[m]["ms_per_step"] = {k: round(1e3 * v / steps, 3) for k, v in r.split_s.items()}
            rows[m]["draft_share"] = round(r.split_s.get("draft", 0.0) / r.wall_s, 3)
            verify_ms = 1e3 * r.split_s.get("verify", 0.0) / steps
            if m != "autoregressive" and verify_ms > 0:
                # what the same tau would give if drafting and bookkeeping were free: tau tokens per verify forward
                ideal = (r.new_tokens / steps) * (1e3 * ref.wall_s / ref.new_tokens) / verify_ms
                rows[m]["ideal_speedup"] = round(ideal, 3)
                rows[m]["achieved_over_ideal"] = round(speed / ref_speed / ideal, 3)
    return rows


def print_table(report: dict) -> None:
    lines = [f"mmspec bench: target={report['target']} device={report['device']} prompts={report['n_prompts']} "
             f"max_new_tokens={report['max_new_tokens']} temperature={report['temperature']} "
             f"dtype={report['dtype']} draft_dtype={report['draft_dtype']}",
             f"{'method':<16}{'tok/s':>9}{'speedup':>9}{'tau':>7}{'lossless':>10}{'peak MB':>9}{'ideal':>8}"
             f"{'draft %':>9}"]
    for m, r in report["methods"].items():
        lossless = "n/a" if r["lossless"] is None else ("yes" if r["lossless"] else "NO")
        ideal = f"{r['ideal_speedup']:>7.2f}x" if "ideal_speedup" in r else f"{'-':>8}"
        draft = f"{100 * r['draft_share']:>8.0f}%" if "draft_share" in r else f"{'-':>9}"
        lines.append(f"{m:<16}{r['tokens_per_s']:>9.1f}{r['speedup']:>8.2f}x{r['mean_accepted']:>7.2f}{lossless:>10}"
                     f"{r['peak_mem_mb']:>9.1f}{ideal}{draft}")
    for m, r in report["methods"].items():
        if "tree" in r:
            t = r["tree"]
            lines.append(f"tree {m}: depth {t['depth']}, top_k {t['top_k']}, total_tokens {t['total_tokens']}")
    print("\n".join(lines))
