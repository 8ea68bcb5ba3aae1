"""`optforge visualize`: PNGs are produced, each drawn path lowers its function, skips are explained."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("matplotlib")

from optforge import visualize  # noqa: E402
from optforge.cli import main  # noqa: E402
from optforge.registry import OptimInfo  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_cli_draws_every_function_and_paths_descend(tmp_path, capsys):
    out = tmp_path / "gallery"
    rc = main(["visualize", "--optimizers", "adam,sgd", "--functions", "rosenbrock,rastrigin,saddle",
               "--steps", "60", "--grid-points", "4", "--out", str(out)])
    assert rc == 0
    for name in ("rosenbrock", "rastrigin", "saddle"):
        data = (out / f"{name}.png").read_bytes()
        assert data.startswith(PNG_MAGIC)
        assert len(data) > 5_000                       # contours and paths, not an empty canvas
        # 232 px per panel (PNG header: width): the gallery's 4 columns are 928 px, shown near
        # 1:1 in the docs, so the 12-pt titles stay legible
        assert int.from_bytes(data[16:20], "big") == 2 * round(visualize.PANEL_INCHES * 80)
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["functions"]) == {"rosenbrock", "rastrigin", "saddle"}
    for fn, entry in summary["functions"].items():
        assert set(entry["paths"]) == {"adam", "sgd"}
        for opt, path in entry["paths"].items():
            assert path["ok"] and path["steps_run"] == 60, (fn, opt)
            assert path["final_value"] < path["start_value"], (fn, opt, path)
    assert "rosenbrock" in capsys.readouterr().out


def test_tuned_lr_is_the_best_of_the_grid():
    info = _info("adam")
    fn = visualize.FUNCTIONS["rosenbrock"]
    best = visualize.tune_lr(info, fn, steps=40, points=4)
    finals = [visualize.run_path(info, fn, lr, 40).score for lr in visualize.lr_grid(1e-3, 4)]
    assert best.score == min(finals)
    assert best.lr in visualize.lr_grid(1e-3, 4)


def test_optimizer_that_needs_a_closure_is_skipped_with_its_reason(tmp_path, monkeypatch):
    import torch

    class NeedsClosure(torch.optim.SGD):
        def step(self, closure=None):
            if closure is None:
                raise RuntimeError("NeedsClosure requires a closure")
            return super().step(closure)

    fake = OptimInfo("needs_closure", NeedsClosure, "test", defaults={"lr": 0.1})
    monkeypatch.setattr(visualize, "_select_optimizers", lambda patterns: [fake, _info("sgd")])
    lines: list[str] = []
    summary = visualize.visualize("saddle", "ignored", steps=10, out=tmp_path, grid_points=2,
                                  log=lines.append)
    assert "closure" in summary["skipped"]["needs_closure"]
    assert any(line.startswith("skip needs_closure:") for line in lines)
    assert list(summary["functions"]["saddle"]["paths"]) == ["sgd"]


def test_bad_input_is_refused(tmp_path, capsys):
    assert main(["visualize", "--functions", "himmelblau", "--out", str(tmp_path)]) == 2
    assert "himmelblau" in capsys.readouterr().err
    assert main(["visualize", "--optimizers", "nosuchopt", "--out", str(tmp_path)]) == 2
    with pytest.raises(ValueError, match="steps=0"):
        visualize.visualize(steps=0, out=tmp_path)


def _info(name: str):
    from optforge.registry import get_optimizer_info

    return get_optimizer_info(name)
