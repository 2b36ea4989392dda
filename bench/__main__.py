"""``python -m bench``: the same command as ``meditron-jax bench``."""
import sys

from bench.cli import main

sys.exit(main())
