"""docs/distributed.md's table names every registered optimizer in the row that says what DDP
and FSDP2 do with it: elementwise ones (foreach and fused, DTensor params supported), per-tensor
reductions and whole matrices (no fused path, DTensor params supported), and the other
whole-tensor ones (no fused path, DTensor params refused). Registering an optimizer, or
changing its flag, without updating the table fails here, with the row to write."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import optforge as of

DOC = Path(__file__).resolve().parents[1] / "docs" / "distributed.md"


def has_fused_path(info) -> bool:
    try:
        info.cls([torch.zeros(1, requires_grad=True)], fused=True)
    except (TypeError, ValueError):
        return False
    return True


def row(first_cell_has: str) -> str:
    rows = [line for line in DOC.read_text().splitlines()
            if line.startswith("|") and first_cell_has in line.split("|")[1]]
    assert len(rows) == 1, f"docs/distributed.md needs one table row whose first cell has {first_cell_has!r}"
    return rows[0]


def whole_matrices(info) -> bool:
    return getattr(info.cls, "whole_matrices", False)


def shard_reductions(info) -> bool:
    return getattr(info.cls, "shard_reductions", False)


@pytest.mark.parametrize("elementwise", [True, False], ids=["elementwise", "whole-tensor"])
def test_the_table_rows_list_the_registry(elementwise):
    infos = [i for i in of.list_optimizers(with_info=True)
             if i.elementwise == elementwise and not whole_matrices(i) and not shard_reductions(i)]
    line = row(f"`elementwise={elementwise}`")
    named = re.findall(r"`([a-z0-9_]+)`", line.split("|")[1])
    expected = ", ".join(f"`{i.name}`" for i in infos)
    assert named == [i.name for i in infos], f"the row should list: {expected}"
    fused_cell = line.split("|")[2]
    fused = "foreach and `fused=True`" in fused_cell
    no_fused = set(re.findall(r"`([a-z0-9_]+)`", fused_cell.partition("(")[2]))   # named exceptions
    assert all(has_fused_path(i) == (fused and i.name not in no_fused) for i in infos), \
        [(i.name, has_fused_path(i)) for i in infos]
    refused = "refused" in line.split("|")[3]
    assert refused != elementwise


def test_the_whole_matrix_row_lists_the_registry():
    infos = [i for i in of.list_optimizers(with_info=True) if whole_matrices(i)]
    line = row("`whole_matrices=True`")
    assert re.findall(r"`([a-z0-9_]+)`", line.split("|")[1].partition(":")[2]) == [i.name for i in infos]
    assert not any(has_fused_path(i) for i in infos) and "refused" not in line.split("|")[3]


def test_the_reductions_row_lists_the_registry():
    infos = [i for i in of.list_optimizers(with_info=True) if shard_reductions(i)]
    line = row("`shard_reductions=True`")
    assert re.findall(r"`([a-z0-9_]+)`", line.split("|")[1].partition(":")[2]) == [i.name for i in infos]
    assert not any(has_fused_path(i) for i in infos) and "refused" not in line.split("|")[3]


def test_the_wrappers_row_names_every_wrapper():
    line = row("wrappers:")
    assert all(f"`{name}`" in line for name in of.wrappers.__all__ if name != "OptimizerWrapper")
