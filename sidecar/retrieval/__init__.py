"""Retrieval over any store: coarse search, fusion, the rerank stage, evaluation."""
