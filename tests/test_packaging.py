"""The distribution maps adapters/, data_tools/ and demos/ under the mmspec namespace and never claims `adapters`.

Both install modes are exercised for real, each into a fresh venv and imported from outside the checkout, so a
mapping that only works from the repo root (where `adapters/` is importable as a plain folder) cannot pass.
"""

import json
import os
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SUBPACKAGES = ("adapters", "data_tools", "demos")

# Run inside the fresh venv: import every public package and report where each came from, and where (if anywhere)
# the bare top-level names resolve, which must never be this project's folders.
PROBE = """
import importlib.util, json, sys
import mmspec, mmspec.adapters, mmspec.data_tools, mmspec.demos
bare = {n: getattr(importlib.util.find_spec(n), "origin", None) for n in ("adapters", "data_tools", "demos")}
print(json.dumps({"prefix": sys.prefix, "mmspec": mmspec.__file__, "adapters": mmspec.adapters.__file__,
                  "data_tools": mmspec.data_tools.__file__, "demos": mmspec.demos.__file__, "bare": bare}))
"""


def _run(cmd, **kw):
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=600, **kw)
    assert r.returncode == 0, f"{cmd}\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
    return r.stdout


def _fresh_venv(path: Path) -> tuple[Path, Path]:
    """A venv whose only own package is what the test installs; torch, transformers and the other dependencies
    resolve from the interpreter running the tests (a .pth lists its site-packages after the venv's own), so
    nothing is downloaded. Returns (python, site-packages)."""
    _run([sys.executable, "-m", "venv", "--without-pip", path])
    python = path / "bin" / "python"
    venv_site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).strip())
    outer = [p for p in site.getsitepackages() + [site.getusersitepackages()] if Path(p).is_dir()]
    (venv_site / "_mmspec_test_deps.pth").write_text("".join(p + "\n" for p in outer))
    return python, venv_site


def _pip_install(python: Path, *args) -> None:
    # The test interpreter's pip installs into the fresh venv (--python), so the venv needs no pip of its own.
    _run([sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", "--no-index",
          "--no-build-isolation", *args])


def _probe(venv: Path, python: Path, cwd: Path) -> dict:
    # -I: a PYTHONPATH pointing at the checkout must not make a broken install pass; .pth files still apply
    where = json.loads(_run([python, "-I", "-c", PROBE], cwd=cwd).splitlines()[-1])
    assert Path(where["prefix"]).resolve() == venv.resolve(), where
    for name, origin in where["bare"].items():
        assert origin is None or not Path(origin).resolve().is_relative_to(ROOT), (name, origin)
    return where


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    # no build isolation: the running environment's setuptools builds it, offline and ~6 s faster
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", out, ROOT])
    (whl,) = out.glob("mmspec-*.whl")
    return whl


def test_wheel_layout(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")} == {"mmspec"}
    for sub in SUBPACKAGES:
        assert f"mmspec/{sub}/__init__.py" in names
    if (ROOT / "mmspec" / "models" / "mini-vlm").is_dir():  # the built-in models ship inside the package
        assert "mmspec/models/mini-vlm/model.safetensors" in names
        assert "mmspec/models/mini-vlm-vispec/model.safetensors" in names
        assert "mmspec/assets/sample_scene.png" in names


def test_wheel_installs_and_imports_outside_the_checkout(wheel, tmp_path):
    python, venv_site = _fresh_venv(tmp_path / "venv")
    before = set(os.listdir(venv_site))
    _pip_install(python, wheel)
    # only the mmspec package and its metadata appear: no top-level adapters / data_tools / demos
    added = set(os.listdir(venv_site)) - before
    assert {n for n in added if not n.endswith(".dist-info")} == {"mmspec"}, added
    for sub in SUBPACKAGES:
        assert not (venv_site / sub).exists() and not (venv_site / f"{sub}.py").exists()

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = _probe(tmp_path / "venv", python, elsewhere)
    installed = (venv_site / "mmspec").resolve()
    assert Path(where["mmspec"]).resolve().parent == installed, where
    for sub in SUBPACKAGES:
        assert Path(where[sub]).resolve().parent == installed / sub, where
    if (ROOT / "mmspec" / "models" / "mini-vlm").is_dir():  # the built-in models come with the install
        assert (installed / "models" / "mini-vlm" / "config.json").is_file()
        assert (installed / "models" / "mini-vlm-vispec" / "model.safetensors").is_file()
        assert (installed / "assets" / "sample_scene.png").is_file()


def test_editable_install_imports_outside_the_checkout(tmp_path):
    python, venv_site = _fresh_venv(tmp_path / "venv")
    before = set(os.listdir(venv_site))
    _pip_install(python, "-e", ROOT)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = _probe(tmp_path / "venv", python, elsewhere)
    assert Path(where["mmspec"]).resolve().parent == ROOT / "mmspec", where
    for sub in SUBPACKAGES:
        assert Path(where[sub]).resolve().parent == ROOT / sub, where
    added = set(os.listdir(venv_site)) - before
    assert not added & set(SUBPACKAGES), added
