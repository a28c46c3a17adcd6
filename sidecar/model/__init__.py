"""The model: open_clip loading, image decoding, the encoder's pre/core/post stages, and the tiny CLIP."""
