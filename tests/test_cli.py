import pytest

from lrm_train import cli


def _bad_config(overrides):
    raise ValueError("unknown config key 'train.max_stepz'")


@pytest.mark.parametrize(
    "rank,line,waited",
    [("0", "error: config: unknown config key 'train.max_stepz'\n", []), ("1", "", [cli.RANK_ZERO_REPORT_WAIT_S])],
)
def test_a_config_error_is_written_by_rank_zero_while_the_other_ranks_wait_for_it(
    rank, line, waited, monkeypatch, capsys
):
    """torchrun stops every rank when one exits non-zero: a rank 1 leaving at once could kill rank 0 before its line."""
    slept = []
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setattr(cli.time, "sleep", slept.append)
    assert cli.run_command(["train.max_stepz=1"], "usage", _bad_config, lambda config, flags: None) == cli.BAD_INPUT
    assert capsys.readouterr().err == line and slept == waited
