"""`meditron-jax demo`: the end-to-end mission on a tiny model (top layer, beside bench)."""
