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
    # built as `pip install .` builds it, with pyproject's build backend: the one installed here
    # when it is recent enough (seconds), else in an isolated environment (pip fetches it)
    isolation = ["--no-build-isolation"] if _setuptools_major() >= 77 else []
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", *isolation, "-w", str(out),
                    str(ROOT)], check=True, capture_output=True)
    (path,) = out.glob("optforge-*.whl")
    return path


def _setuptools_major() -> int:
    try:
        import setuptools
    except ImportError:
        return 0
    return int(setuptools.__version__.split(".")[0])


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
    # one interpreter (torch imports once): where optforge comes from, then `python -m optforge`
    script = ("import runpy, sys, optforge; print(optforge.__file__); "
              "sys.argv = ['optforge', 'list', 'adamw']; "
              "runpy.run_module('optforge', run_name='__main__', alter_sys=True)")
    where, out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True,
                                text=True, check=True).stdout.split("\n", 1)
    assert where.startswith(str(target))
    assert out.startswith("adamw")
    assert (target / "bin" / "optforge").exists()                     # the console script
    from importlib.metadata import Distribution

    (dist,) = Distribution.discover(name="optforge", path=[str(target)])  # the metadata is installed
    assert dist.version == _project_version()


def test_wheel_declares_the_command_and_the_dependencies(wheel):
    archive = zipfile.ZipFile(wheel)
    info = next(n.split("/")[0] for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
    entry_points = archive.read(f"{info}/entry_points.txt").decode()
    assert "optforge = optforge.cli:main" in entry_points
    metadata = archive.read(f"{info}/METADATA").decode()
    assert "Requires-Dist: torch>=2.4" in metadata
    assert f"Version: {_project_version()}" in metadata


def _project_version() -> str:
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
