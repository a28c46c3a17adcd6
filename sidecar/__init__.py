"""clip-sidecar: CLIP image/text search with an embedded store or OpenSearch."""
