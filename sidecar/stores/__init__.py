"""Retrieval stores: one interface, embedded (default) and OpenSearch."""
