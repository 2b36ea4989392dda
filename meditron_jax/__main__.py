from meditron_jax.cli import entry

entry()
