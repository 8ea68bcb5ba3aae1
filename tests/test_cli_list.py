"""`optforge list`: the registry as a table."""

from __future__ import annotations

import argparse
import importlib.util

import pytest

from optforge import cli
from optforge.registry import list_optimizers


def _table(capsys, filter: str = "*") -> tuple[int, list[str], str]:
    code = cli.cmd_list(argparse.Namespace(filter=filter))
    out = capsys.readouterr()
    return code, out.out.splitlines(), out.err


def _check_table(lines: list[str], infos) -> None:
    assert lines[0].split()[:4] == ["name", "aliases", "description", "defaults"]
    rows = {line.split()[0]: line for line in lines[1:]}
    assert set(rows) == {i.name for i in infos}
    for info in infos:
        row = rows[info.name]
        assert info.description in row
        for alias in info.aliases:
            assert alias in row
        if "lr" in info.defaults:
            assert f"lr={info.defaults['lr']}" in row
        assert "maximize" not in row


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
    names = {line.split()[0] for line in lines[1:]}
    assert {"adam", "adamw", "adam_warmup"} <= names
    assert "sgd" not in names and "compass" not in names
    code, lines, _ = _table(capsys, "LODEW")                # by alias, any case
    assert [line.split()[0] for line in lines[1:]] == ["compass"]


def test_list_no_match(capsys):
    code, lines, err = _table(capsys, "nosuch*")
    assert code == 2 and lines == [] and "nosuch*" in err


@pytest.mark.skipif(importlib.util.find_spec("optforge.compare") is None
                    or importlib.util.find_spec("optforge.compare.cli") is None,
                    reason="optforge.compare.cli (imported by cli.build_parser) is not written yet")
def test_main_list(capsys):
    assert cli.main(["list"]) == 0
    _check_table(capsys.readouterr().out.splitlines(), list_optimizers(with_info=True))
