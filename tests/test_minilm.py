"""The embedded MiniLM loads offline and matches sentence-transformers' own pipeline."""

import pytest
import torch

from qcompile import corpus, minilm

sentence_transformers = pytest.importorskip(
    "sentence_transformers", reason="sentence-transformers is the independent reference"
)


def test_embeddings_match_sentence_transformers():
    model, tokenizer = minilm.load()
    texts = corpus.docstrings("val", limit=8)
    with torch.no_grad():
        ours = model(**minilm.tokenize(tokenizer, texts, max_length=128))
    reference = sentence_transformers.SentenceTransformer(str(minilm.model_dir()), device="cpu")
    theirs = torch.as_tensor(reference.encode(texts, convert_to_numpy=True))
    assert ours.shape == (8, 384)
    torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=1e-4)
