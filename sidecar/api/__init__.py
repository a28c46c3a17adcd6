"""HTTP API blueprints: embeddings, search, operations (health, readiness, metrics)."""
