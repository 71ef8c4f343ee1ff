"""The experiments' commands refuse bad input with one line: the reliability battery's cases X01-X18 and A01-A18 that
stop before any training, X17 (the README's example), and the same classes of input in every command (a non-positive
number that is divided by or logged, an unwritable out_dir).

Every row of ``REFUSED`` is refused before any training - by the settings' own checks or while the runs are composed -
so each takes a second or two, and none may leave a folder behind (no out_dir, no ``runs/``).
"""

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from harness import assert_refused, assert_untouched, run_main, snapshot
from runs import COMPARE_TWO_ARMS, overrides

from lrm_train.config_compose import compose_schema
from lrm_train.experiments import abm, compare, coord_check, norm_sweep, runner, width_scaling

COMMANDS = {
    "compare": compare.main,
    "abm": abm.main,
    "norm_sweep": norm_sweep.main,
    "width_scaling": width_scaling.main,
    "coord_check": coord_check.main,
}
README = Path(__file__).resolve().parents[2] / "README.md"
# The battery's SMALL comparison, shortened: one optimizer at one LR, so a comparison plans one run per arm.
SMALL = ["optimizers=[adamw]", "lr_points=1", "tuned_config=null"]
# A sweep of three points that abm finishes in a few seconds with its slope inside the accepted range.
SHORT_ABM = ["optimizers=[adamw]", "ratios=[1e-2,1e-1,1.0]", "products=[4e-2]"]


def case(case_id: str, command: str, argv: list[str], match: str):
    """``{tmp}`` in argv: the test's folder (it holds ``afile``, a regular file); without an ``out_dir=`` the row
    gets ``out_dir={tmp}/out``."""
    return pytest.param(command, argv, match, id=case_id)


REFUSED = [
    # compare: the arms, the grid, the launcher (regressions X02-X12, X18), and X01 (a new arm without '+')
    case("X01", "compare", [*SMALL, 'arms.bad=["lrm=foo"]'], r"run bad-adamw-.*Could not find 'lrm/foo'"),
    case("X02", "compare", [*SMALL, '+arms.big=["model.num_hidden_layers=2"]'], r"run big-.* another model config"),
    case("X03", "compare", [*SMALL, '+arms.x=["train.max_stepz=3"]'], r"unknown config key 'train\.max_stepz'"),
    case("X04", "compare", ["baseline=nope"], r"baseline='nope' is not one of the arms"),
    case("X05", "compare", ["lr_points=0"], r"lr_points=0 must be >= 1"),
    case("X07", "compare", ["seeds=[0,0]"], r"seeds=\[0, 0\] must be distinct"),
    case("X-selseeds", "compare", ["selection_seeds=[]"], r"selection_seeds=\[\] must be distinct and at least one"),
    case("X-overlap", "compare", ["seeds=[1,0]"], r"seeds=\[1, 0\] holds the selection seed 0: the held-out seeds"),
    case("X-finals", "compare", ["final_evals=0"], r"final_evals=0 must be >= 1"),
    case("X-finals9", "compare", [*SMALL, "final_evals=9"], r"final_evals=9: a run evaluates only 8 times"),
    case("X-threads", "compare", ["threads=-1"], r"threads=-1 must be >= 0"),
    case("X-parallel", "compare", ["parallel=0"], r"parallel=0 must be >= 1"),
    case("X-par-nproc", "compare", ["parallel=2", "nproc=2"], r"parallel=2 runs single-process runs side by side"),
    case("X08", "compare", ["launcher=bogus"], r"launcher: Invalid value 'bogus', expected one of \[local, slurm\]"),
    case("X09", "compare", ["optimizers=[sgd]"], r"lr_center has no LR for optimizer 'sgd'"),
    case("X11", "compare", ["--foo"], r"unknown option '--foo'"),
    case("X12", "compare", [*SMALL, '+arms.x=["train.max_steps=30"]'], r"run x-.* another train config"),
    case("X18", "compare", [*SMALL, 'arms.lrm=["lrm=foo"]'], r"run lrm-adamw-.*Could not find 'lrm/foo'"),
    case("X-armz", "compare", ['armz.x=["lrm=full"]'], r"unknown config key 'armz'"),
    case("X-lr0", "compare", [*SMALL, "lr_center.adamw=0"], r"lr_center\.adamw=0\.0 must be > 0"),
    case("X-lrneg", "compare", [*SMALL, "lr_center.muon=-1e-3"], r"lr_center\.muon=-0\.001 must be > 0"),
    case("X-nproc", "compare", ["nproc=-1"], r"nproc=-1 must be >= 0"),
    case("X-nodes", "compare", ["slurm.nodes=0"], r"slurm\.nodes=0 must be >= 1"),
    case("X-dsbatch", "compare", ["downstream.batch_size=0"], r"downstream\.batch_size=0 must be >= 1"),
    case("X-dslimit", "compare", ["downstream.limit=0"], r"downstream\.limit=0\.0 must be > 0"),
    case("X-outdir", "compare", [*SMALL, "out_dir={tmp}/afile/cmp"], r"out_dir=.*/afile/cmp: .*Not a directory"),
    # abm (A01-A08)
    case("A01", "abm", ["foo=1"], r"unknown config key 'foo'"),
    case("A02", "abm", ["run={tmp}/nope"], r"run=.*/nope: no metrics\.jsonl there"),
    case("A03", "abm", ["optimizers=[sgd]"], r"optimizers: 'sgd' is not one of adamw, muon"),
    case("A04", "abm", ["products=[0]"], r"products=\[0\.0\]: every lr\*wd product must be > 0"),
    case("A05", "abm", ["ratios=[-1]"], r"ratios=\[-1\.0\]: every lr/wd ratio must be > 0"),
    case("A06", "abm", ["model=nope"], r"Could not find 'model/nope' \(options: .*tiny"),
    case("A06-key", "abm", ["model.hidden_size=0"], r"model\.hidden_size=0 must be a positive integer"),
    case("A07", "abm", ["out_dir={tmp}/afile/abm"], r"out_dir=.*/afile/abm: .*Not a directory"),
    case("A08", "abm", ["timescales=0", *SHORT_ABM], r"timescales=0\.0 must be > 0"),
    case("A-opt0", "abm", ["optimizers=[]"], r"optimizers=\[\] must name at least one"),
    case("A-ratio1", "abm", ["ratios=[1,1]"], r"ratios=\[1\.0, 1\.0\]: .* 2 different ratios"),
    case("A-points", "abm", ["ratios=[0.1,1]", "products=[1e-3]"], r"ratios x products: .* 3 points or more"),
    case("A-flag", "abm", ["--foo"], r"unknown option '--foo'"),
    # norm_sweep (A09, A10)
    case("A09", "norm_sweep", ["experiment=nope"], r"Could not find 'experiment/nope'"),
    case("A10", "norm_sweep", ["scales=[0]"], r"scales=\[0\.0\]: every S must be > 0"),
    case("N-scales", "norm_sweep", ["scales=[]"], r"scales=\[\] must hold at least one S"),
    case("N-elr", "norm_sweep", ["effective_lr=0"], r"effective_lr=0\.0 must be > 0"),
    case("N-wd0", "norm_sweep", ['trainer=["optim.weight_decay=0"]'], r"optim\.weight_decay=0\.0 .*must be > 0"),
    case("N-outdir", "norm_sweep", ["scales=[1.0]", "out_dir={tmp}/afile/ns"], r"out_dir=.*/ns: .*Not a directory"),
    # width_scaling (A11, A12)
    case("A11", "width_scaling", ["widths=[64]"], r"widths: the exponent fit needs 3 widths or more, got \[64\]"),
    case(
        "A12", "width_scaling", ["widths=[60,120,240]", "head_dim=32"], r"width 60 is not a multiple of 2 x head_dim=32"
    ),
    case("W-zero", "width_scaling", ["widths=[0,64,128]"], r"widths=\[0, 64, 128\]: every width must be > 0"),
    case("W-dup", "width_scaling", ["widths=[64,64,128]"], r"widths=\[64, 64, 128\] must be distinct"),
    case("W-head", "width_scaling", ["head_dim=0"], r"head_dim=0 must be >= 1"),
    case("W-layers", "width_scaling", ["layers=0"], r"layers=0 must be >= 1"),
    case("W-outdir", "width_scaling", ["out_dir={tmp}/afile/ws"], r"out_dir=.*/afile/ws: .*Not a directory"),
    # coord_check (A13-A18)
    case("A13", "coord_check", ['trainer=["optim.lr=abc"]'], r"run coord_adamw_lr1_none_w64: optim\.lr: .*'abc'"),
    case("A14", "coord_check", ["arms=[bogus]"], r"run coord_adamw_lr1_bogus_w64: .*Could not find 'lrm/bogus'"),
    case("A15", "coord_check", ["widths=[64,128]"], r"widths: the slope needs 3 widths or more, got \[64, 128\]"),
    case("A16", "coord_check", ["out_dir={tmp}/afile/cc"], r"out_dir=.*/afile/cc: .*Not a directory"),
    case("A17", "coord_check", ["steps=0"], r"steps=0 must be >= 2"),
    case("A18", "coord_check", ["break_multiplier=nope"], r"break_multiplier='nope' is not a model multiplier"),
    case("C-head", "coord_check", ["head_dim=0"], r"head_dim=0 must be >= 1"),
    case("C-zero", "coord_check", ["widths=[0,64,128]"], r"widths=\[0, 64, 128\]: every width must be > 0"),
    case("C-slope", "coord_check", ["max_slope=-1"], r"max_slope=-1\.0 must be >= 0"),
    case("C-arms", "coord_check", ["arms=[]"], r"arms=\[\] must name at least one"),
]


@pytest.fixture
def no_work(monkeypatch):
    """Reaching a trainer run or the ABM sweep fails a row at once (rather than training for minutes)."""

    def work(*args, **kwargs):
        raise AssertionError("the command started its work")

    monkeypatch.setattr(runner, "train", work)
    monkeypatch.setattr(abm, "sweep", work)


@pytest.mark.parametrize("command, argv, match", REFUSED)
def test_bad_input_is_one_line_and_creates_nothing(command, argv, match, tmp_path, monkeypatch, no_work):
    monkeypatch.chdir(tmp_path)  # a default out_dir (compare's runs/<name>) would be created here
    (tmp_path / "afile").write_text("a file where a folder is expected\n")
    args = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    if not any(a.startswith("out_dir=") for a in args):
        args.append(f"out_dir={tmp_path}/out")
    before = snapshot(tmp_path)
    assert_refused(run_main(COMMANDS[command], args), match)
    assert_untouched(before)
    assert [p.name for p in tmp_path.iterdir()] == ["afile"]


def test_readme_and_help_example_adds_an_arm(tmp_path, monkeypatch):
    """X17: the README's and --help's own example works as written."""
    monkeypatch.chdir(tmp_path)
    example = 'arms.lrm_one=["lrm=full","lrm.init=one"]'
    assert f"'{example}'" in README.read_text()
    assert example in run_main(compare.main, ["--help"]).stdout
    outcome = run_main(compare.main, [example, "tuned_config=null", "--estimate"])
    assert outcome.code == 0 and not outcome.stderr and not outcome.escaped, outcome.stderr + outcome.escaped
    # 5 arms (mup, lrm, lrm_untuned, transplant, lrm_one) under AdamW: 6 LRs on selection seeds 0-2 (the transplant's
    # 18 waiting for lrm's), then 5 held-out seeds (25 waiting)
    assert outcome.stdout.startswith("115 runs (43 of them waiting")
    assert not list(tmp_path.iterdir())  # --estimate writes nothing


def test_an_arm_override_replaces_that_arm_and_keeps_the_others():
    overrides = compare.arm_overrides(['arms.lrm=["lrm=scalar"]', "tuned_config=null"])
    cfg = compose_schema("compare", compare.CompareConfig, overrides)
    assert cfg.arms == {
        "mup": ["lrm=none"],
        "lrm": ["lrm=scalar"],
        "lrm_untuned": ["lrm=full", "lrm.init=mup"],
        "transplant": ["lrm=none"],
    }


# Per command, settings that make it compose few runs (a read-only out_dir is found once they are composed).
FEW_RUNS = {
    "compare": SMALL,
    "abm": [],
    "norm_sweep": ["scales=[1.0]"],
    "width_scaling": [],
    "coord_check": ["arms=[none]", "widths=[64,128,256]"],
}


@pytest.mark.parametrize("command", FEW_RUNS)
def test_an_out_dir_on_a_read_only_mount_is_one_line(command, tmp_path, monkeypatch, no_work):
    """A07, simulated: the tests run as root, which a permission bit would not stop."""

    def read_only(path, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(Path, "mkdir", read_only)
    outcome = run_main(COMMANDS[command], [*FEW_RUNS[command], f"out_dir={tmp_path}/ro/{command}"])
    assert_refused(outcome, rf"out_dir=.*/ro/{command}: cannot create it \(Read-only file system\)")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("command", FEW_RUNS)
def test_an_existing_out_dir_that_cannot_be_written_is_one_line(command, tmp_path, monkeypatch, no_work):
    out = tmp_path / "ro"
    out.mkdir()
    access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: Path(path) != out and access(path, mode, **kw))
    outcome = run_main(COMMANDS[command], [*FEW_RUNS[command], f"out_dir={out}"])
    assert_refused(outcome, rf"out_dir={out}: cannot write there")
    assert not list(out.iterdir())


def test_a_full_disk_in_the_middle_of_the_work_is_one_line(tmp_path, monkeypatch):
    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "out" / "report.json"))

    monkeypatch.setattr(abm, "sweep", full_disk)
    assert_refused(run_main(abm.main, [f"out_dir={tmp_path}/out"]), r"No space left on device: .*report\.json")


def test_abm_takes_a_model_preset_as_the_trainer_does(tmp_path):
    """A06: ``model=<preset>`` (here a YAML preset of configs/model) and ``model.<field>`` reach the sweep."""
    out = tmp_path / "abm"
    outcome = run_main(abm.main, ["model=tiny_deep", "model.vocab_size=1024", *SHORT_ABM, f"out_dir={out}"])
    assert outcome.code == 0 and not outcome.escaped and not outcome.error_lines, outcome.stderr + outcome.escaped
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["model"]["num_hidden_layers"] == 8
    assert "embedding/1024x128" in {fit["shadow"] for fit in report["slopes"]}


def two_arm_comparison(data_root, tmp_path, parallel: int, **train_changes) -> list[str]:
    """The argv of a comparison of the micro model's two arms at one LR: 2 sweep runs on seed 0, then 2 held-out
    runs on seed 1."""
    train = {k: v for k, v in overrides(data_root, "unused").items() if k != "train.run_dir"}
    train.update(train_changes)
    return [
        f"out_dir={tmp_path / 'cmp'}",
        "train=" + json.dumps([f"{k}={v}" for k, v in train.items()]),
        "optimizers=[adamw]",
        "lr_points=1",
        "selection_seeds=[0]",
        "seeds=[1]",
        "final_evals=1",
        f"parallel={parallel}",
        *COMPARE_TWO_ARMS,
    ]


def sigterm_at_step_2(data_root, tmp_path, parallel: int) -> list[str]:
    """A comparison's argv whose runs each get SIGTERM at step 2."""
    signal_at_2 = {"+callbacks.term._target_": "faulty_callbacks.SignalAt", "+callbacks.term.at": 2}
    return two_arm_comparison(data_root, tmp_path, parallel, **{"train.max_steps": 4, **signal_at_2})


def test_sigterm_during_a_comparison_saves_the_run_in_progress_and_says_how_to_go_on(data_root, tmp_path):
    outcome = run_main(compare.main, sigterm_at_step_2(data_root, tmp_path, parallel=1))  # one run, in this process
    [kept] = (tmp_path / "cmp").glob("runs/*/checkpoints/step_00000002")
    assert outcome.code == 143 and not outcome.escaped
    assert outcome.stderr.splitlines()[-1] == (
        f"stopped: SIGTERM at step 2; saved the checkpoint {kept} (run the same command to resume from it); "
        "run the same command again to go on"
    )


def test_sigterm_at_a_runs_last_step_stops_the_comparison_before_the_next_run(data_root, tmp_path):
    """A run finishes the step a signal lands in when it is its last (its final checkpoint is what a stop would
    save); the signal then stops the sequence there rather than being lost with the run's handler, which let a
    sequential experiment go on to its next run."""
    signal_at_end = {"+callbacks.term._target_": "faulty_callbacks.SignalAt", "+callbacks.term.at": 4}
    outcome = run_main(
        compare.main, two_arm_comparison(data_root, tmp_path, 1, **{"train.max_steps": 4, **signal_at_end})
    )
    assert outcome.code == 143 and not outcome.escaped
    [run] = (tmp_path / "cmp").glob("runs/*")  # no other run began
    assert (run / "checkpoints" / "step_00000004").is_dir()  # and this one finished
    assert outcome.stderr.splitlines()[-1] == (
        "stopped: SIGTERM between runs (every run begun has finished); run the same command again to go on"
    )


def test_sigterm_as_a_run_starts_stops_it_at_its_first_step_with_a_checkpoint(data_root, tmp_path):
    """A signal before a run's loop takes over (it once found the default handler and killed the comparison with
    the run half set up): the run steps once, saves, and the comparison stops with the trainer's line."""
    signal_at_start = {"+callbacks.term._target_": "faulty_callbacks.SignalAt", "+callbacks.term.at": 0}
    argv = two_arm_comparison(data_root, tmp_path, 1, **{"train.max_steps": 4, **signal_at_start})
    outcome = run_main(compare.main, argv)
    [kept] = (tmp_path / "cmp").glob("runs/*/checkpoints/step_00000001")
    assert outcome.code == 143 and not outcome.escaped
    assert outcome.stderr.splitlines()[-1].startswith(f"stopped: SIGTERM at step 1; saved the checkpoint {kept} ")


@pytest.mark.multiprocess
def test_sigterm_in_parallel_runs_saves_each_and_ends_the_comparison_with_its_status(data_root, tmp_path):
    """Two sweep runs side by side in spawned processes, each stopped by SIGTERM at step 2: both save, and the
    worker's ending reaches this process with its line and status (143)."""
    outcome = run_main(compare.main, sigterm_at_step_2(data_root, tmp_path, parallel=2))
    kept = sorted((tmp_path / "cmp").glob("runs/*/checkpoints/step_00000002"))
    assert [p.parts[-3].split("-")[0] for p in kept] == ["lrm", "mup"]  # the two sweep runs; no held-out run began
    assert outcome.code == 143 and not outcome.escaped
    last = outcome.stderr.splitlines()[-1]
    assert last.startswith("stopped: SIGTERM at step 2; saved the checkpoint ") and last.endswith(
        "(run the same command to resume from it); run the same command again to go on"
    )


def two_long_runs_in_parallel(data_root, tmp_path, **train_extra) -> tuple[subprocess.Popen, list[Path]]:
    """A comparison command whose two sweep runs train side by side (5000 steps, no checkpoint before the end), once
    both have logged two steps; and their metrics files."""
    long = {"train.max_steps": 5000, "train.ckpt_every": 10000, "train.eval_every": 10000}
    argv = two_arm_comparison(data_root, tmp_path, parallel=2, **long, **train_extra)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent)}
    command = subprocess.Popen(
        [sys.executable, "-m", "lrm_train.experiments.compare", *argv], stderr=subprocess.PIPE, text=True, env=env
    )
    metrics = [tmp_path / "cmp" / "runs" / f"{arm}-adamw-lr0.008-s0" / "metrics.jsonl" for arm in ("lrm", "mup")]
    deadline = time.monotonic() + 240
    while not all(m.exists() and m.read_text().count("\n") >= 2 for m in metrics):
        assert command.poll() is None and time.monotonic() < deadline, command.stderr.read() if command.poll() else ""
        time.sleep(0.1)
    return command, metrics


@pytest.mark.multiprocess
def test_sigterm_to_the_command_with_parallel_runs_saves_each_run_in_progress(data_root, tmp_path):
    """A SIGTERM sent to the comparison's own process (``kill``, ``timeout``, a supervisor: not to its process group)
    while two runs train in its spawned workers: each run saves where it is and the command exits 143 with the
    resume line, instead of dying at once and leaving the workers to train on, unseen, and lose their steps."""
    command, metrics = two_long_runs_in_parallel(data_root, tmp_path)
    command.send_signal(signal.SIGTERM)
    _, stderr = command.communicate(timeout=120)  # returns once every worker has closed the stderr it inherited
    assert command.returncode == 143, stderr[-2000:]
    for m in metrics:
        [kept] = (m.parent / "checkpoints").iterdir()
        assert 2 <= int(kept.name.removeprefix("step_")) < 5000
    last = stderr.splitlines()[-1]
    assert last.startswith("stopped: SIGTERM at step ") and last.endswith("run the same command again to go on")


@pytest.mark.multiprocess
def test_a_second_sigterm_ends_the_command_and_its_workers_at_once(data_root, tmp_path):
    hold = {"+callbacks.hold._target_": "faulty_callbacks.HoldAfterStopSignal", "+callbacks.hold.seconds": 300}
    command, metrics = two_long_runs_in_parallel(data_root, tmp_path, **hold)
    command.send_signal(signal.SIGTERM)
    time.sleep(1)  # the workers have it, and hold their step
    command.send_signal(signal.SIGTERM)
    command.communicate(timeout=60)  # returns once no worker is left holding the stderr pipe
    assert command.returncode == -signal.SIGTERM
    assert not any((m.parent / "checkpoints").exists() for m in metrics)  # killed while holding: nothing saved


@pytest.mark.multiprocess
def test_a_stop_signal_while_no_run_trains_ends_the_command_with_its_status(data_root, tmp_path, monkeypatch):
    """SIGTERM reaching the command as its workers start (forwarded to them, it once killed them and broke the pool),
    and no worker trains after it (both runs are at their end, so no trainer loops to take it): the workers end their
    runs untouched, and the command still stops with the signal's status."""
    argv = two_arm_comparison(data_root, tmp_path, parallel=1)
    sweep = [r for r in compare.plan(compose_schema("compare", compare.CompareConfig, argv)) if not r.waiting_for]
    runner.run_local(sweep, nproc=1, threads=1)
    before = {r.name: (r.run_dir / "metrics.jsonl").read_text() for r in sweep}
    signalled = []

    def wait_after_a_signal(*args, **kwargs):
        if not signalled:
            signalled.append(os.kill(os.getpid(), signal.SIGTERM))
        return real_wait(*args, **kwargs)

    real_wait = runner.wait
    monkeypatch.setattr(runner, "wait", wait_after_a_signal)
    with pytest.raises(runner.Stopped, match="^SIGTERM with no run in progress$") as stopped:
        runner._train_in_parallel(list(enumerate(sweep, 1)), len(sweep), threads=1, parallel=2)
    assert stopped.value.exit_code == 143 and len(sweep) == 2
    assert {r.name: (r.run_dir / "metrics.jsonl").read_text() for r in sweep} == before
    assert all(runner.run_status(r) == runner.FINISHED for r in sweep)
