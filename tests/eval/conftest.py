import pytest

from lrm_train.data.tokenizer import train_bpe

# Words the test tokenizer learns as single tokens (each repeated often in its training text).
WHOLE_WORDS = (" the", " abcdefghijklmnop", " yes", " no", " cat", " dog")


@pytest.fixture(scope="session")
def tokenizer_json(tmp_path_factory):
    """A 512-token BPE (the micro model's vocabulary) that knows ``WHOLE_WORDS`` as whole tokens."""
    text = " ".join(WHOLE_WORDS) * 400
    sentences = ["The cat sat on the mat, and the dog barked at the cat.", "Is it yes or no? It is yes."] * 200
    tokenizer = train_bpe([text, *sentences], 512)
    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.json"
    tokenizer.save(str(path))
    return path
