import math

import pytest
import torch

from lrm_train.optim import ParamClass, clipped_norm

# Two matrix parts (3 and 4: 5 together), a multiplier part split in two (1 and 2: sqrt 5) and a norm part (0).
NORMS = [
    (ParamClass.MATRIX, torch.tensor(3.0)),
    (ParamClass.MULTIPLIER, torch.tensor(1.0)),
    (ParamClass.MATRIX, torch.tensor(4.0)),
    (ParamClass.MULTIPLIER, torch.tensor(2.0)),
    (ParamClass.NORM, torch.tensor(0.0)),
]


@pytest.mark.parametrize("clip_multipliers,clipped", [(False, 5.0), (True, math.sqrt(30.0))])
def test_the_clipped_norm_holds_the_multipliers_only_when_asked(clip_multipliers, clipped):
    norms = clipped_norm(NORMS, clip_multipliers, max_norm=1.0)
    torch.testing.assert_close(norms.clipped, torch.tensor(clipped))
    torch.testing.assert_close(norms.multipliers, torch.tensor(math.sqrt(5.0)))  # logged either way
    torch.testing.assert_close(norms.scale, torch.tensor(1.0 / (clipped + 1e-6)))


def test_the_scale_never_grows_a_gradient_and_clipping_can_be_off():
    torch.testing.assert_close(clipped_norm(NORMS, False, max_norm=10.0).scale, torch.tensor(1.0))
    off = clipped_norm(NORMS, False, max_norm=0.0)
    assert off.scale is None and float(off.clipped) == 5.0


def test_without_multipliers_there_is_no_multiplier_norm():
    norms = clipped_norm([(ParamClass.MATRIX, torch.tensor(2.0))], True, max_norm=1.0)
    assert norms.multipliers is None and float(norms.clipped) == 2.0


def test_a_model_of_multipliers_only_clips_nothing_without_them():
    norms = clipped_norm([(ParamClass.MULTIPLIER, torch.tensor(2.0))], False, max_norm=1.0)
    assert float(norms.clipped) == 0.0 and float(norms.scale) == 1.0
