"""lm-eval's own command line with our model registered: ``python -m lrm_train.eval.harness run --model lrm_train
--model_args path=CHECKPOINT --tasks ...`` (stock task names: they need the hub; offline, use ``python -m
lrm_train.eval``)."""

from lm_eval.__main__ import cli_evaluate

import lrm_train.eval.model  # noqa: F401 - registers the lrm_train model

if __name__ == "__main__":
    cli_evaluate()
