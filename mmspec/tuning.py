"""What both tree tuners share (mmspec.autotune for text and VLM targets, mmspec.image_autotune for image generators):
the cache file and its keys, the machine's name, timing a verify forward, the scoring of every shape and the record
kept of it, and the one device `sync` the engine's timings use too.

It imports no pipeline and no tuner: a tuner reads a pipeline through what the pipeline exposes (`runner`, `device`,
`drafter`, `with_tree`), and `mmspec.load` is the one place that hands a pipeline its tuner.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import time
from pathlib import Path
from typing import Callable, Iterable

import torch

from .config import TreeConfig
from .errors import InputError
from .target import cache_keep
from .tree import DraftTree

logger = logging.getLogger(__name__)

CACHE_VERSION = 1  # a change to what an entry means bumps it: older entries are then measured again


def sync(device: torch.device) -> None:
    """Wait for the device: honest timing on an asynchronous one needs the work to have finished."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cache_file() -> Path:
    root = os.environ.get("MMSPEC_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mmspec"
    return Path(root) / "tree_auto.json"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def cache_key(pipe, source: str) -> str:
    """Everything a measured shape depends on: the models (`source`), the machine, the dtypes, torch and its threads."""
    draft_dtype = next(pipe.drafter.parameters()).dtype
    parts = (f"v{CACHE_VERSION}", source, str(pipe.device.type), device_name(pipe.device), str(pipe.target.dtype),
             str(draft_dtype), torch.__version__, f"threads={torch.get_num_threads()}")
    return " | ".join(parts)


def read_cache(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # no cache yet, or an unreadable one: measure again (and rewrite it)


def write_cache(path: Path, key: str, entry: dict) -> None:
    data = read_cache(path)
    data[key] = entry
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        tmp.replace(path)  # atomic: a concurrent reader sees the old file or the new one
    except OSError as e:
        logger.warning("could not cache the tuned tree in %s (%s); it will be measured again next time", path, e)


def cached_tree(entry) -> tuple[TreeConfig, dict] | None:
    """A cache entry as (tree, entry), or None when it is missing, not one this version wrote, or MMSPEC_RETUNE=1 asks
    for a fresh measurement (a shape tuned while the machine was busy; the new one replaces it)."""
    if os.environ.get("MMSPEC_RETUNE", "") not in ("", "0"):
        return None
    try:
        return TreeConfig(**{k: entry["tree"][k] for k in ("depth", "top_k", "total_tokens")}), entry
    except (TypeError, KeyError, InputError):
        return None


@torch.no_grad()
def verify_times(runner, inputs: dict, rows, vocab: int, totals: Iterable[int], reps: int = 5) -> dict[int, float]:
    """Median ms of `runner.verify` over a random N-token chain after the prompt rows `inputs` (their engine.Rows
    `rows`), for N in 1 + totals; the cache goes back to the prompt after each."""
    pre = runner.prefill(inputs, True, False, rows.positions)
    past = inputs["input_ids"].shape[1]
    runner.mask.start(rows.pads)
    times: dict[int, list[float]] = {}
    g = torch.Generator().manual_seed(0)
    for _ in range(reps):
        for n in (1, *totals):
            tree = DraftTree.chain(torch.randint(vocab, (n,), generator=g), device=runner.device)
            t = time.perf_counter()
            runner.verify(tree, pre.cache, past, rows.next_pos, True)
            sync(runner.device)
            times.setdefault(n, []).append((time.perf_counter() - t) * 1e3)
            cache_keep(pre.cache, past, torch.tensor([], dtype=torch.long))  # back to the prompt
    return {n: statistics.median(v) for n, v in times.items()}


def measure_other(pipe, run: Callable[[object], object], tree: TreeConfig) -> float:
    """ms per step outside drafting, verifying and the prefill: `run(probe)` -> Stats of a short speculative run on
    `pipe` drafting with `tree` (a mid-sized shape)."""
    stats = run(pipe.with_tree(tree))
    return stats.other_s * 1e3 / max(stats.target_forwards - 1, 1)


def best_shape(taus: dict[tuple[int, int, int], float], verify_ms: dict[int, float], draft_ms: dict[int, float],
               other_ms: float, device: torch.device, started: float) -> tuple[TreeConfig, dict]:
    """The shape with the most tokens per second, tau / (verify(total) + depth * draft_forward(top_k) + other), over
    `taus` {(top_k, depth, total): expected tokens per step}, and the record the cache keeps of the choice."""
    scored = []
    for (k, depth, total), tau in taus.items():
        step_ms = verify_ms[total] + depth * draft_ms[k] + other_ms
        scored.append((tau / step_ms, depth, k, total, tau, step_ms))
    _, depth, k, total, tau, step_ms = max(scored)
    tree = TreeConfig(depth=depth, top_k=k, total_tokens=total)
    return tree, {
        "tree": {"depth": depth, "top_k": k, "total_tokens": total},
        "expected_tau": round(tau, 3),
        "expected_speedup": round(tau / step_ms * (verify_ms[1] + other_ms), 3),  # over the same loop without drafts
        "verify_ms": {str(n): round(v, 3) for n, v in verify_ms.items()},
        "draft_forward_ms": {str(k): round(v, 3) for k, v in draft_ms.items()},
        "other_ms": round(other_ms, 3),
        "device": device_name(device),
        "measured_s": round(time.perf_counter() - started, 1),
        "date": time.strftime("%Y-%m-%d"),
    }
