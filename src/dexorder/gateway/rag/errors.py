"""The knowledge base's errors; each message says what to change."""

from __future__ import annotations


class RagError(RuntimeError):
    """Base of every knowledge-base error."""


class EmbeddingError(RagError):
    """The embedding model could not be loaded or did not answer correctly."""


class RagStoreError(RagError):
    """Qdrant could not be opened, or refused an operation."""


class DimensionMismatch(RagStoreError):
    """The embedding model's vectors do not fit the existing collection."""


class IngestError(RagError):
    """A document could not be read."""
