import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Triton kernels run on the CPU through Triton's interpreter where no GPU is present; the
# switch must be set before triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def minilm_encoder():
    """(SentenceEncoder, tokenizer) of the real all-MiniLM-L6-v2, loaded once per session.

    Shared: a test may prepare, calibrate or export it (`prepare` copies the model, never
    modifies it) but must never train, round or otherwise change it in place.
    """
    from qcompile.demo import minilm

    model, tokenizer = minilm.load()
    before = {name: value.clone() for name, value in model.state_dict().items()}
    yield model, tokenizer
    # a test that changed the shared model would silently change every later one's numbers
    changed = [name for name, value in model.state_dict().items()
               if not torch.equal(value, before[name])]
    assert not changed, f"a test modified the shared MiniLM: {changed[:3]}"
