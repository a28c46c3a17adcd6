"""The offline path: corpus readers, decode workers, the embed job writing vector shards, the index step."""
