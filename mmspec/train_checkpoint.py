"""Training checkpoints: safetensors + JSON only, so resuming never unpickles. A checkpoint holds the drafter, the
optimizer and schedule, and the LoopState that decides the rest of the run, and is refused by a run it does not fit."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from safetensors.torch import save_file
from torch import Tensor

from .drafter import CONFIG_NAME, WEIGHTS_NAME, Drafter, DrafterConfig, read_weights
from .errors import InputError

# TrainConfig fields that do not change what training computes; every other one must match to resume a run exactly
RESUME_FREE = ("save_every", "teacher_cache_gb")


@dataclass
class LoopState:
    """What, besides weights, optimizer and schedule, decides the rest of a run: the data order (the order generator
    as it was before this epoch's permutation, and how many of this epoch's batches are done) and every process's
    noise generator. A run resumed from it takes exactly the steps an uninterrupted run would have taken."""

    step: int = 0
    skipped: int = 0
    consumed: int = 0
    epoch_order: Tensor | None = None  # ByteTensor: torch.Generator state
    noise: list[Tensor] = field(default_factory=list)  # one generator state per process, by process index


def save_checkpoint(path: Path, drafter: Drafter, optimizer, scheduler, loop: LoopState, config: dict,
                    scaler=None) -> None:
    """Write a resumable checkpoint of the run whose TrainConfig is `config` (as a dict)."""
    tmp = path.with_name(path.name + ".tmp")
    drafter.save_pretrained(tmp)
    state = optimizer.state_dict()
    tensors = {f"{i}.{k}": v.detach().cpu().contiguous() for i, st in state["state"].items() for k, v in st.items()}
    tensors["loop.epoch_order"] = loop.epoch_order
    tensors.update({f"loop.noise.{rank}": g for rank, g in enumerate(loop.noise)})
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    meta = {"step": loop.step, "skipped": loop.skipped, "consumed": loop.consumed, "processes": len(loop.noise),
            "config": config, "param_groups": state["param_groups"], "scheduler": scheduler.state_dict(),
            "scaler": None if scaler is None else scaler.state_dict()}
    (tmp / "trainer_state.json").write_text(json.dumps(meta, default=float))
    if path.exists():
        shutil.rmtree(path)
    tmp.rename(path)  # a crash mid-save leaves the previous checkpoint intact


def load_checkpoint(path: Path, drafter: Drafter, optimizer, scheduler, config: dict, world: int,
                    scaler=None) -> LoopState:
    """Restore a checkpoint into freshly built objects, refusing one that the same command did not write."""
    try:
        meta = json.loads((path / "trainer_state.json").read_text())
        saved = DrafterConfig.from_dict(json.loads((path / CONFIG_NAME).read_text()))
        old_cfg, step, skipped, consumed = meta["config"], meta["step"], meta["skipped"], meta["consumed"]
    except (OSError, ValueError, TypeError, KeyError) as e:  # KeyError: a checkpoint of an older mmspec
        raise InputError(f"cannot resume from {path} ({type(e).__name__}: {e}); delete it or use a new --out") from None
    changed = [f"{k}={old_cfg.get(k)!r} (now {v!r})" for k, v in config.items()
               if k not in RESUME_FREE and old_cfg.get(k) != v]
    changed += [f"{k}={getattr(saved, k)!r} (now {v!r})" for k, v in asdict(drafter.config).items()
                if k != "extra" and getattr(saved, k) != v]
    if meta.get("processes") != world:
        changed.append(f"{meta.get('processes')} processes (now {world})")
    if changed:
        raise InputError(f"checkpoint {path} was written by a different run: {', '.join(changed)}; rerun the same "
                         f"command to resume it, or use a new --out")
    try:
        drafter.load_state_dict(read_weights(path / WEIGHTS_NAME))  # strict: every tensor, nothing else
    except RuntimeError as e:  # missing, unexpected or misshapen tensors
        raise InputError(f"the weights in checkpoint {path} do not fit this drafter: {' '.join(str(e).split())}") from None
    tensors = read_weights(path / "optimizer.safetensors")
    loop = LoopState(step=int(step), skipped=int(skipped), consumed=int(consumed),
                     epoch_order=tensors.pop("loop.epoch_order"),
                     noise=[tensors.pop(f"loop.noise.{rank}") for rank in range(world)])
    state: dict[int, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    scheduler.load_state_dict(meta["scheduler"])
    if scaler is not None and meta.get("scaler"):
        scaler.load_state_dict(meta["scaler"])
    return loop
