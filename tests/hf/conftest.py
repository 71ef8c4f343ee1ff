import pytest

from lrm_train.models import FalconH1Config, FalconH1LM
from lrm_train.nn import LRMConfig

# fmt: off
SMALL = dict(
    vocab_size=97, hidden_size=32, num_hidden_layers=1, intermediate_size=48, num_attention_heads=4,
    num_key_value_heads=2, mamba_d_ssm=32, mamba_n_heads=4, mamba_d_head=8, mamba_d_state=8, mamba_chunk_size=8,
)
# fmt: on


@pytest.fixture
def small_model():
    """A one-layer Falcon-H1 that exports and loads in milliseconds."""
    return FalconH1LM(FalconH1Config(**SMALL), LRMConfig("full"))
