"""The numpy all-MiniLM-L6-v2 against sentence-transformers' own output for the same model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from dexorder.gateway.rag.minilm import DIMENSION, EmbeddedModelError, MiniLM, read_safetensors

REFERENCE = json.loads((Path(__file__).parent / "data" / "minilm_reference.json").read_text())


@pytest.fixture(scope="module")
def model() -> MiniLM:
    return MiniLM()


def test_vectors_match_sentence_transformers(model: MiniLM) -> None:
    texts = [entry["text"] for entry in REFERENCE["vectors"]]
    expected = np.array([entry["vector"] for entry in REFERENCE["vectors"]], dtype=np.float32)
    ours = model.embed(texts)
    assert ours.shape == (len(texts), DIMENSION)
    cosines = (ours * expected).sum(axis=1)
    assert cosines.min() > 0.99999
    assert np.abs(ours - expected).max() < 1e-5  # the reference is rounded to 6 places


def test_vectors_are_unit_length_and_order_independent(model: MiniLM) -> None:
    texts = ["short", "a somewhat longer sentence about trading", "mid length text"]
    forward = model.embed(texts)
    backward = model.embed(texts[::-1])[::-1]
    assert np.allclose(np.linalg.norm(forward, axis=1), 1.0, atol=1e-5)
    assert np.allclose(forward, backward, atol=1e-5)  # padding in a batch changes nothing


def test_similar_sentences_are_closer(model: MiniLM) -> None:
    stop, stop_again, cat = model.embed(
        [
            "Place the stop loss below the recent swing low.",
            "Put your stop-loss order under the last swing low.",
            "The cat sleeps on the sofa all afternoon.",
        ]
    )
    assert float(stop @ stop_again) > 0.7
    assert float(stop @ cat) < 0.2


def test_long_texts_are_truncated_to_the_models_window(model: MiniLM) -> None:
    assert model.token_count("word " * 1000) == 256
    assert model.embed([]).shape == (0, DIMENSION)


def test_broken_weights_are_a_clear_error(tmp_path: Path) -> None:
    broken = tmp_path / "model.safetensors"
    broken.write_bytes(b"\x05\x00")
    with pytest.raises(EmbeddedModelError, match="cannot read model weights"):
        read_safetensors(broken)
    with pytest.raises(EmbeddedModelError, match="cannot load the embedded model"):
        MiniLM(tmp_path)
