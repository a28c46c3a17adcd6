"""Online encoding: the micro-batcher, the text-vector cache, and Prometheus metrics."""
