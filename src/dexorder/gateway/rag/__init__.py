"""Retrieval over Qdrant: embeddings, a tenant-isolated collection, ingestion and search."""
