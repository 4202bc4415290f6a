"""Built-in mini models shipped inside the package (see data_tools/build_minis.py for how they are made)."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import InputError, MissingInputError

MODELS_DIR = Path(__file__).parent / "models"
REBUILD = "python -m mmspec.data_tools.build_minis"

# target name -> its default drafter
BUILTIN_TARGETS = {"mini-vlm": "mini-vlm-vispec", "mini-gen": "mini-gen-drafter"}
# drafter name -> the target it was trained for
BUILTIN_DRAFTERS = {"mini-vlm-vispec": "mini-vlm", "mini-vlm-eagle": "mini-vlm", "mini-gen-drafter": "mini-gen"}
BUILTIN_ASSISTANTS = {"mini-vlm-assistant": "mini-vlm"}


def builtin_path(name: str) -> Path:
    path = MODELS_DIR / name
    if not path.is_dir() or not any(path.iterdir()):
        raise MissingInputError(f"the built-in model {name!r} is not in this installation ({path}); rebuild it with `{REBUILD}`")
    return path


def is_builtin(name: str) -> bool:
    return name in BUILTIN_TARGETS or name in BUILTIN_DRAFTERS or name in BUILTIN_ASSISTANTS


def resolve_dir(name: str | os.PathLike, what: str) -> Path:
    """A built-in name, a local directory, or a Hugging Face id already in the local cache -> its directory.
    `what` ("target", "drafter") names the argument in the error."""
    name_s = str(name)
    if is_builtin(name_s):
        return builtin_path(name_s)
    path = Path(name_s).expanduser()
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name_s, local_files_only=True))
    except Exception:  # noqa: BLE001 - any hub failure means "not available offline"; we say so below
        raise MissingInputError(
            f"{what} {name_s!r} is not a built-in name ({', '.join(sorted(BUILTIN_TARGETS))}), a local directory, or a "
            f"Hugging Face id in the local cache (mmspec never downloads)"
        ) from None


def sample_image_path() -> Path:
    """The bundled sample scene used when `mmspec caption` gets no image."""
    path = Path(__file__).parent / "assets" / "sample_scene.png"
    if not path.is_file():
        raise MissingInputError(f"the bundled sample image is missing ({path}); rebuild with `{REBUILD}`")
    return path


def target_config(name: str | os.PathLike):
    """-> (directory, transformers config) of a target, with a clear error for a missing or unreadable config."""
    from transformers import AutoConfig

    path = resolve_dir(name, "target")
    try:
        return path, AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:  # no or a broken config.json, or a model type transformers lacks
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"cannot read the config of target {str(name)!r} ({path}): {first}") from None
