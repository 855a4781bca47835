"""The standard-library corpus: real text, deterministic, split by file."""

import pytest

from qcompile.demo import corpus


def test_train_and_val_are_disjoint_by_file():
    train = {p for p in corpus.stdlib_files() if corpus._in_split(p, "train")}
    val = {p for p in corpus.stdlib_files() if corpus._in_split(p, "val")}
    assert train and val
    assert not train & val
    assert train | val == set(corpus.stdlib_files())
    assert 0.05 < len(val) / len(train | val) < 0.2


def test_docstrings_are_real_text_and_deterministic():
    first = corpus.docstrings("val", limit=50)
    assert len(first) == 50
    assert all(40 <= len(t) <= 1000 and "\n" not in t for t in first)
    assert corpus.docstrings("val", limit=50) == first
    assert len(set(first)) > 40  # mostly distinct texts, not one repeated string


def test_source_text_respects_max_chars():
    text = corpus.source_text("val", max_chars=10_000)
    assert len(text) == 10_000
    assert "def " in text


def test_bad_split_is_refused():
    with pytest.raises(ValueError, match="split must be"):
        corpus.docstrings("test")
