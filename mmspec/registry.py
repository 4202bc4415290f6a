"""Built-in mini models shipped inside the package (see data_tools/build_minis.py for how they are made)."""

from __future__ import annotations

from pathlib import Path

MODELS_DIR = Path(__file__).parent / "models"
REBUILD = "python -m mmspec.data_tools.build_minis"

# target name -> its default drafter
BUILTIN_TARGETS = {"mini-vlm": "mini-vlm-vispec"}
# drafter name -> the target it was trained for
BUILTIN_DRAFTERS = {"mini-vlm-vispec": "mini-vlm", "mini-vlm-eagle": "mini-vlm"}
BUILTIN_ASSISTANTS = {"mini-vlm-assistant": "mini-vlm"}


def builtin_path(name: str) -> Path:
    path = MODELS_DIR / name
    if not path.is_dir() or not any(path.iterdir()):
        raise FileNotFoundError(f"the built-in model {name!r} is not in this installation ({path}); rebuild it with `{REBUILD}`")
    return path


def is_builtin(name: str) -> bool:
    return name in BUILTIN_TARGETS or name in BUILTIN_DRAFTERS or name in BUILTIN_ASSISTANTS


def sample_image_path() -> Path:
    """The bundled sample scene used when `mmspec caption` gets no image."""
    path = Path(__file__).parent / "assets" / "sample_scene.png"
    if not path.is_file():
        raise FileNotFoundError(f"the bundled sample image is missing ({path}); rebuild with `{REBUILD}`")
    return path
