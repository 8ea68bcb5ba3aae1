"""`optforge compare`: small-step runs of every task, the outputs' schema, determinism, --tune,
Ctrl-C, and the bad-input paths (exit 2, one line on stderr, no traceback)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

from optforge.cli import main  # noqa: E402
from optforge.compare import runner  # noqa: E402
from optforge.compare.options import (  # noqa: E402
    default_lr,
    parse_lrs,
    parse_optimizer_args,
    parse_seeds,
)
from optforge.compare.runner import lr_grid  # noqa: E402

RUN_KEYS = {"optimizer", "seed", "lr", "optimizer_kwargs", "split", "steps_done", "diverged",
            "train_loss", "test_loss", "test_acc", "final_train_loss", "final_test_loss",
            "final_test_acc", "steps_to_target", "step_time_ms", "opt_step_time_ms",
            "state_bytes_per_param", "wall_time_s"}
TIMING_KEYS = {"step_time_ms", "opt_step_time_ms", "wall_time_s"}


@pytest.fixture(scope="module", autouse=True)
def _private_cache(tmp_path_factory):
    """MNIST-1D's generated arrays go to a temporary cache, not the user's."""
    mp = pytest.MonkeyPatch()
    mp.setenv("OPTFORGE_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    yield
    mp.undo()


def compare(out: Path, *args: str) -> int:
    return main(["compare", "--no-progress", "--out", str(out), *args])


def strict_load(path: Path) -> dict:
    def no_nan(token):
        raise AssertionError(f"non-JSON number {token} in {path}")
    return json.loads(path.read_text(), parse_constant=no_nan)


def check_outputs(out: Path, *, optimizers: list[str], seeds: int, steps: int,
                  classification: bool, plot: bool = True) -> dict:
    res = strict_load(out / "results.json")
    assert res["schema_version"] == 1 and res["complete"] is True
    assert {"config", "task", "tuning", "summary", "runs", "created", "optforge_version",
            "torch_version"} <= set(res)
    cfg = res["config"]
    assert cfg["optimizers"] == optimizers and cfg["steps"] == steps
    assert len(cfg["seeds"]) == seeds and set(cfg["lr"]) == set(optimizers)
    assert res["task"]["metric"] == ("accuracy" if classification else "loss")
    assert res["task"]["n_params"] > 0 and res["task"]["n_test"] > 0
    assert len(res["runs"]) == len(optimizers) * seeds
    for run in res["runs"]:
        assert set(run) == RUN_KEYS
        assert run["optimizer"] in optimizers and run["steps_done"] == steps
        assert run["lr"] == cfg["lr"][run["optimizer"]]
        curves = [run["train_loss"], run["test_loss"]] + ([run["test_acc"]] if classification else [])
        for c in curves:
            assert len(c["step"]) == len(c["value"]) > 0
            assert c["step"] == sorted(c["step"]) and c["step"][-1] == steps
        assert run["test_loss"]["step"][0] == 0
        assert (run["test_acc"] is not None) == classification
        assert run["state_bytes_per_param"] >= 0 and run["step_time_ms"] > 0
    assert list(res["summary"]) == optimizers
    for row in res["summary"].values():
        assert row["runs"] == seeds
        assert {"mean", "std", "n"} == set(row["final_test_loss"])
    png = out / "curves.png"
    if plot:
        assert png.stat().st_size > 1000
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert not png.exists()
    return res


# ---- each task, small --------------------------------------------------------------------------
def test_linear(tmp_path, capsys):
    assert compare(tmp_path, "--task", "linear", "--optimizers", "sgd,adam", "--steps", "200",
                   "--seeds", "2", "--lr", "sgd=0.1,adam=0.1") == 0
    res = check_outputs(tmp_path, optimizers=["sgd", "adam"], seeds=2, steps=200,
                        classification=False)
    sgd = [r for r in res["runs"] if r["optimizer"] == "sgd"]
    assert all(r["final_test_loss"] < 1e-3 for r in sgd)        # y = 5x + 10 is learnt
    assert all(r["steps_to_target"] is not None for r in sgd)
    table = capsys.readouterr().out
    assert "sgd" in table and "adam" in table and "±" in table and "test acc" not in table


def test_digits_mlp(tmp_path, capsys):
    assert compare(tmp_path, "--optimizers", "sgd,momentum_sgd,adam,compass", "--steps", "150",
                   "--seeds", "2", "--eval-every", "50") == 0
    res = check_outputs(tmp_path, optimizers=["sgd", "momentum_sgd", "adam", "compass"], seeds=2,
                        steps=150, classification=True)
    assert res["config"]["lr"] == {"sgd": 0.1, "momentum_sgd": 0.01, "adam": 1e-3, "compass": 1e-3}
    assert res["runs"][0]["test_acc"]["step"] == [0, 50, 100, 150]
    for run in res["runs"]:
        assert run["final_test_acc"] > 50                        # learning, in 150 steps
    by_name = {r["optimizer"]: r for r in res["runs"]}
    assert by_name["sgd"]["state_bytes_per_param"] < 0.01       # only the step counters
    assert by_name["momentum_sgd"]["state_bytes_per_param"] == pytest.approx(4, abs=0.01)
    assert by_name["adam"]["state_bytes_per_param"] == pytest.approx(8, abs=0.01)
    assert "test acc %" in capsys.readouterr().out


def test_digits_cnn(tmp_path):
    assert compare(tmp_path, "--model", "cnn", "--optimizers", "adam", "--steps", "40",
                   "--seeds", "1", "--no-plot") == 0
    res = check_outputs(tmp_path, optimizers=["adam"], seeds=1, steps=40, classification=True,
                        plot=False)
    assert res["task"]["model"] == "cnn"


@pytest.mark.parametrize("model", ["logistic", "mlp", "cnn"])
def test_mnist1d(tmp_path, model):
    assert compare(tmp_path, "--task", "mnist1d", "--model", model, "--optimizers", "adam,sgd",
                   "--steps", "30", "--seeds", "1") == 0
    res = check_outputs(tmp_path, optimizers=["adam", "sgd"], seeds=1, steps=30,
                        classification=True)
    assert res["task"]["n_train"] == 4000 and res["task"]["n_test"] == 1000
    assert res["task"]["n_params"] == {"logistic": 410, "mlp": 78_858, "cnn": 5_210}[model]


# ---- determinism ------------------------------------------------------------------------------
def _without_timing(runs: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in runs]


def test_deterministic_for_a_seed(tmp_path):
    args = ["--optimizers", "adam,radam", "--steps", "60", "--seeds", "1", "--no-plot"]
    assert compare(tmp_path / "a", *args) == 0
    torch.manual_seed(1234)                                       # global state must not matter
    assert compare(tmp_path / "b", *args) == 0
    a = strict_load(tmp_path / "a" / "results.json")["runs"]
    b = strict_load(tmp_path / "b" / "results.json")["runs"]
    assert _without_timing(a) == _without_timing(b)


def test_seeds_differ(tmp_path):
    assert compare(tmp_path, "--optimizers", "adam", "--steps", "30", "--seeds", "0,7",
                   "--no-plot") == 0
    runs = strict_load(tmp_path / "results.json")["runs"]
    assert [r["seed"] for r in runs] == [0, 7]
    assert runs[0]["train_loss"]["value"] != runs[1]["train_loss"]["value"]


# ---- --tune -----------------------------------------------------------------------------------
def test_tune_picks_from_the_grid(tmp_path, capsys):
    assert compare(tmp_path, "--optimizers", "sgd,adam,radam", "--lr", "radam=2e-3", "--steps", "40",
                   "--seeds", "1", "--tune", "--no-plot") == 0
    res = strict_load(tmp_path / "results.json")
    tuning = res["tuning"]
    assert set(tuning) == {"sgd", "adam"}                          # an explicit --lr is not tuned
    for name, t in tuning.items():
        assert t["grid"] == lr_grid(default_lr(name)) and len(t["grid"]) == 5
        assert t["chosen_lr"] in t["grid"]
        assert res["config"]["lr"][name] == t["chosen_lr"]
        assert len(t["val_acc"]) == 5 and all(0 <= a <= 100 for a in t["val_acc"])
        best = max(t["val_acc"])
        assert t["val_acc"][t["grid"].index(t["chosen_lr"])] == best
    assert res["config"]["lr"]["radam"] == 2e-3
    assert res["config"]["lr_source"] == {"sgd": "tuned", "adam": "tuned", "radam": "--lr"}
    assert "lr sweep" in capsys.readouterr().out


def test_lr_grid():
    assert lr_grid(1e-3) == [1e-4, 3.162e-4, 1e-3, 3.162e-3, 1e-2]
    assert lr_grid(0.1, points=3) == [0.01, 0.1, 1.0]


# ---- Ctrl-C -----------------------------------------------------------------------------------
def test_ctrl_c_keeps_finished_runs(tmp_path, monkeypatch, capsys):
    real, calls = runner.train_run, []

    def interrupted_on_third(*a, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(runner, "train_run", interrupted_on_third)
    assert compare(tmp_path, "--optimizers", "sgd,adam", "--steps", "20", "--seeds", "2") == 130
    res = strict_load(tmp_path / "results.json")
    assert res["complete"] is False
    assert [(r["optimizer"], r["seed"]) for r in res["runs"]] == [("sgd", 0), ("adam", 0)]
    assert (tmp_path / "curves.png").stat().st_size > 1000
    assert "interrupted" in capsys.readouterr().err


# ---- option parsing ---------------------------------------------------------------------------
def test_parse_lrs():
    opts = ["sgd", "adam", "compass"]
    assert parse_lrs(["adam=3e-3,SGD=0.5", "lodew=1e-4"], opts) == {"adam": 3e-3, "sgd": 0.5,
                                                                    "compass": 1e-4}
    assert parse_lrs(["0.01"], opts) == dict.fromkeys(opts, 0.01)
    assert parse_lrs(None, opts) == {}


def test_parse_optimizer_args():
    opts = ["adam", "compass"]
    got = parse_optimizer_args(["adam:betas=0.9,0.99", "weight_decay=1e-4",
                                "compass:centralization=1", "adam:amsgrad=true",
                                "compass:weight_decay_mode=absolute"], opts)
    assert got == {"adam": {"betas": (0.9, 0.99), "weight_decay": 1e-4, "amsgrad": True},
                   "compass": {"weight_decay": 1e-4, "centralization": 1,
                               "weight_decay_mode": "absolute"}}


def test_parse_seeds():
    assert parse_seeds("3") == [0, 1, 2]
    assert parse_seeds("4,2") == [4, 2]


def test_default_lrs():
    assert default_lr("sgd") == 0.1 and default_lr("momentum_sgd") == 0.01
    assert default_lr("adam") == 1e-3 and default_lr("noam") == 5.0


# ---- bad input: exit 2, one line, no traceback ------------------------------------------------
BAD_INPUT = {
    "unknown task": (["--task", "cifar"], "unknown task 'cifar'"),
    "unknown model": (["--model", "resnet"], "unknown model 'resnet'"),
    "unknown optimizer": (["--optimizers", "adam,adamx"], "unknown optimizer 'adamx'"),
    "empty optimizers": (["--optimizers", ","], "names no optimizer"),
    "lr not a number": (["--lr", "adam=fast"], "malformed --lr"),
    "lr no value": (["--lr", "adam="], "malformed --lr"),
    "lr no name": (["--lr", "=0.1"], "no optimizer name"),
    "lr negative": (["--lr", "adam=-1"], "positive"),
    "lr empty entry": (["--lr", "adam=1e-3,,sgd=0.1"], "empty entry"),
    "lr not compared": (["--lr", "radam=1e-3"], "not in --optimizers"),
    "lr unknown name": (["--lr", "adamx=1e-3"], "unknown optimizer 'adamx'"),
    "optimizer arg unknown": (["--optimizer_args", "adam:momentum=0.9"], "has no argument"),
    "optimizer arg malformed": (["--optimizer_args", "adam:betas"], "malformed --optimizer_args"),
    "optimizer arg invalid": (["--optimizer_args", "adam:betas=2,3"], "adam"),
    "seeds": (["--seeds", "three"], "malformed --seeds"),
    "steps": (["--steps", "0"], "--steps must be at least 1"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUT))
def test_bad_input_in_process(tmp_path, capsys, case):
    args, message = BAD_INPUT[case]
    assert compare(tmp_path / "out", "--optimizers", "sgd,adam", *args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("optforge compare: error: "), err
    assert message in err
    assert not (tmp_path / "out" / "results.json").exists()


def _subprocess(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "optforge.cli", "compare", "--no-progress", *args],
                          capture_output=True, text=True, timeout=120)


def test_unwritable_out_subprocess(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    p = _subprocess("--out", str(blocker / "sub"), "--steps", "5")
    assert p.returncode == 2
    assert p.stderr.count("\n") == 1 and "Traceback" not in p.stderr
    assert "cannot write to --out" in p.stderr and p.stdout == ""


def test_unknown_task_subprocess(tmp_path):
    p = _subprocess("--task", "mnist2d", "--out", str(tmp_path))
    assert p.returncode == 2
    assert p.stderr.strip() == ("optforge compare: error: unknown task 'mnist2d'; did you mean "
                                "'mnist1d'? (choose from: linear, digits, mnist1d)")


def test_argparse_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["compare", "--steps", "many"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "invalid int value: 'many'" in err


def test_threads_restored(tmp_path):
    before = torch.get_num_threads()
    assert compare(tmp_path, "--task", "linear", "--optimizers", "sgd", "--steps", "5",
                   "--seeds", "1", "--threads", "1", "--no-plot") == 0
    assert torch.get_num_threads() == before


def test_nonfinite_values_are_null_in_json(tmp_path):
    assert compare(tmp_path, "--task", "linear", "--optimizers", "sgd", "--lr", "sgd=1e6",
                   "--steps", "50", "--seeds", "1", "--no-plot") == 0
    run = strict_load(tmp_path / "results.json")["runs"][0]
    assert run["diverged"] is True and run["steps_done"] < 50
    assert run["final_test_loss"] is None and run["final_train_loss"] is None


def test_schedule_free_is_evaluated_at_x_not_y():
    """Schedule-Free trains at y and is meant to be evaluated at x (its eval()): compare's
    evaluation switches it there and back."""
    import optforge as of

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
    opt = of.ScheduleFreeAdamW(model.parameters(), lr=0.05)
    for _ in range(20):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    at_y = runner.evaluate(model, x, y, True)
    opt.eval()
    at_x = runner.evaluate(model, x, y, True)
    opt.train()
    got = runner.evaluate(model, x, y, True, opt)
    assert got[0] == pytest.approx(at_x[0], rel=1e-6) and got[0] != pytest.approx(at_y[0], rel=1e-6)
    assert all(g["train_mode"] for g in opt.param_groups)          # back to training at y
    assert runner.evaluate(model, x, y, True)[0] == pytest.approx(at_y[0], rel=1e-6)


def test_lookahead_names(tmp_path, capsys):
    """``lookahead_<name>`` runs the optimizer inside Lookahead; its options go through
    --optimizer_args, and its slow weights count as state."""
    assert compare(tmp_path, "--optimizers", "adamw,Lookahead_AdamW", "--steps", "30", "--seeds", "1",
                   "--optimizer_args", "lookahead_adamw:lookahead_k=3") == 0
    res = strict_load(tmp_path / "results.json")
    runs = {r["optimizer"]: r for r in res["runs"]}
    assert set(runs) == {"adamw", "lookahead_adamw"}
    assert runs["lookahead_adamw"]["optimizer_kwargs"] == {"lookahead_k": 3}
    assert runs["lookahead_adamw"]["lr"] == runs["adamw"]["lr"]
    assert runs["lookahead_adamw"]["state_bytes_per_param"] == pytest.approx(
        runs["adamw"]["state_bytes_per_param"] + 4, abs=0.01)
    assert runs["lookahead_adamw"]["final_test_acc"] != runs["adamw"]["final_test_acc"]
    capsys.readouterr()
    assert compare(tmp_path, "--optimizers", "adamw", "--optimizer_args", "lookahead_k=3") == 2
    assert "lookahead_k" in capsys.readouterr().err
