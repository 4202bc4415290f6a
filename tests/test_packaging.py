"""The distribution maps adapters/, data_tools/ and demos/ under the mmspec namespace and never claims `adapters`."""

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_layout(tmp_path):
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path), str(ROOT)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    (wheel,) = tmp_path.glob("mmspec-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")} == {"mmspec"}
    for sub in ("adapters", "data_tools", "demos"):
        assert f"mmspec/{sub}/__init__.py" in names
    if (ROOT / "mmspec" / "models" / "mini-vlm").is_dir():  # the built-in models ship inside the package
        assert "mmspec/models/mini-vlm/model.safetensors" in names
        assert "mmspec/models/mini-vlm-vispec/model.safetensors" in names
        assert "mmspec/assets/sample_scene.png" in names


def test_editable_install_imports_the_namespaced_packages():
    import mmspec.adapters
    import mmspec.data_tools
    import mmspec.demos

    assert Path(mmspec.adapters.__file__).parent == ROOT / "adapters"
    assert Path(mmspec.data_tools.__file__).parent == ROOT / "data_tools"
    assert Path(mmspec.demos.__file__).parent == ROOT / "demos"
