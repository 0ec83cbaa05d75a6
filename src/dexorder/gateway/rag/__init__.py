"""Retrieval over Qdrant: embeddings, a tenant-isolated collection, ingestion and search."""

# The owner of the shared knowledge base, visible to every user. Defined here, not in
# store.py, so that light modules (the command line) need not import qdrant-client.
SHARED_OWNER = "*"
