"""`optforge list`: the registry as a table."""

from __future__ import annotations

import argparse
import importlib.util
import re

import pytest

from optforge import cli
from optforge.registry import list_optimizers


def _table(capsys, filter: str = "*", long: bool = False) -> tuple[int, list[str], str]:
    code = cli.cmd_list(argparse.Namespace(filter=filter, long=long))
    out = capsys.readouterr()
    return code, out.out.splitlines(), out.err


def _rows(lines: list[str]) -> dict[str, tuple[str, str]]:
    """name -> (aliases, description), each cell's wrapped lines joined."""
    a, d = lines[0].index("aliases"), lines[0].index("description")
    rows: dict[str, tuple[str, str]] = {}
    name = None
    for line in lines[1:]:
        if not line.strip():
            break
        if not line.startswith(" "):
            name = line.split()[0]
            rows[name] = ("", "")
        aliases, description = rows[name]
        rows[name] = (f"{aliases} {line[a:d].strip()}".strip(), f"{description} {line[d:].strip()}".strip())
    return rows


def _check_table(lines: list[str], infos) -> None:
    assert lines[0].split() == ["name", "aliases", "description"]
    assert max(map(len, lines)) <= 100                      # fits a 100-column terminal
    rows = _rows(lines)
    assert set(rows) == {i.name for i in infos}
    for info in infos:
        aliases, description = rows[info.name]
        assert description == " ".join(info.description.split())
        assert aliases == ", ".join(info.aliases)


def test_list_prints_every_optimizer(capsys):
    code, lines, _ = _table(capsys)
    assert code == 0
    infos = list_optimizers(with_info=True)
    _check_table(lines, infos)
    compass = next(line for line in lines if line.startswith("compass "))
    assert "lodew" in compass
    assert any(line.startswith("momentum_sgd ") and "momentumsgd" in line for line in lines)


def test_list_filter(capsys):
    code, lines, _ = _table(capsys, "adam*")
    assert code == 0
    names = set(_rows(lines))
    assert {"adam", "adamw", "adam_warmup"} <= names
    assert "sgd" not in names and "compass" not in names
    code, lines, _ = _table(capsys, "LODEW")                # by alias, any case: its details
    assert code == 0 and lines[0].split()[0] == "compass"
    assert "    betas = (0.9, 0.999)" in lines and "    centralize_1d = True" in lines


def test_list_long_shows_every_default(capsys):
    code, lines, _ = _table(capsys, "adam*", long=True)
    text = "\n".join(lines)
    for info in list_optimizers("adam*", with_info=True):
        assert f"\n{info.name}" in "\n" + text
        for k, v in info.defaults.items():
            assert f"    {k} = {v!r}" in lines


def test_list_no_match(capsys):
    code, lines, err = _table(capsys, "nosuch*")
    assert code == 2 and lines == [] and "nosuch*" in err


@pytest.mark.skipif(importlib.util.find_spec("optforge.compare") is None
                    or importlib.util.find_spec("optforge.compare.cli") is None,
                    reason="optforge.compare.cli (imported by cli.build_parser) is not written yet")
def test_main_list(capsys):
    assert cli.main(["list"]) == 0
    _check_table(capsys.readouterr().out.splitlines(), list_optimizers(with_info=True))


def test_no_arguments_prints_help_and_version(capsys):
    assert cli.main([]) == 0
    assert "usage: optforge" in capsys.readouterr().out
    with pytest.raises(SystemExit) as done:
        cli.main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.startswith("optforge ")


def test_python_dash_m_runs_the_command():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "optforge", "list", "sgd"], capture_output=True,
                         text=True, check=True).stdout
    assert out.startswith("sgd") and "momentum = 0.0" in out


@pytest.mark.parametrize("command", [[], ["list"], ["compare"], ["visualize"]])
def test_help_is_plain_text(capsys, command):
    """Descriptions come from docstrings: their reST markup (``code``, :mod:`x`) is dropped."""
    with pytest.raises(SystemExit):
        cli.main([*command, "--help"])
    text = capsys.readouterr().out
    assert "usage: optforge" in text
    assert "``" not in text and not re.search(r":\w+:`", text), text
    if command == ["visualize"]:
        assert "summary.json beside the PNGs" in text
