"""The wheel users get from `pip install .` (not the editable install the tests run on)."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # built as `pip install .` builds it: in an isolated environment with pyproject's build backend
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(ROOT)],
                   check=True, capture_output=True)
    (path,) = out.glob("optforge-*.whl")
    return path


def test_wheel_ships_the_license_and_every_subpackage(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    sources = {n for n in names if n.startswith("optforge/") and n.endswith(".py")}
    expected = {str(p.relative_to(ROOT / "src")) for p in (ROOT / "src" / "optforge").rglob("*.py")}
    assert sources == expected
    assert "optforge/py.typed" in names


def test_installed_wheel_imports_and_runs(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                    str(wheel)], check=True, capture_output=True)
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run([sys.executable, "-m", "optforge", "list", "adamw"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, check=True).stdout
    assert out.startswith("adamw")
    where = subprocess.run([sys.executable, "-c", "import optforge; print(optforge.__file__)"], cwd=tmp_path,
                           env=env, capture_output=True, text=True, check=True).stdout
    assert where.startswith(str(target))
