from lrm_train.experiments.runner import composed_once, make_run
from lrm_train.train import compose

OVERRIDES = ["optim=muon", "lrm=scalar", "model.hidden_size=64", "train.max_steps=3"]


def test_the_seeds_of_one_config_composed_once_are_what_each_composes_alone(tmp_path):
    with composed_once():
        runs = [make_run(f"run_s{seed}", tmp_path / f"s{seed}", OVERRIDES, seed=seed, arm="lrm") for seed in (0, 1, 2)]
    for run in runs:
        assert run.cfg == compose(run.overrides)
    assert [(r.cfg.train.seed, r.cfg.experiment.name) for r in runs] == [(0, "run_s0"), (1, "run_s1"), (2, "run_s2")]
    assert [r.run_dir for r in runs] == [tmp_path / "s0", tmp_path / "s1", tmp_path / "s2"]
    assert [r.labels for r in runs] == [{"arm": "lrm", "seed": seed} for seed in (0, 1, 2)]
    runs[0].cfg.optim.lr = 1.0  # each run owns its config
    assert runs[1].cfg.optim.lr != 1.0


def test_an_override_that_reads_the_run_s_identity_is_composed_for_each_run(tmp_path):
    overrides = [*OVERRIDES, "logging.wandb.group=${experiment.name}"]
    with composed_once():
        runs = [make_run(f"run_s{seed}", tmp_path / f"s{seed}", overrides, seed=seed) for seed in (0, 1)]
    assert [r.cfg.logging.wandb.group for r in runs] == ["run_s0", "run_s1"]


def test_the_run_s_own_seed_overrides_one_among_its_overrides(tmp_path):
    run = make_run("run", tmp_path / "run", [*OVERRIDES, "train.seed=9"], seed=2)
    assert run.cfg.train.seed == 2 and run.cfg == compose(run.overrides)
