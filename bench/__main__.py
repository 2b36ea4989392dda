"""``python -m bench``: the same command as ``meditron-jax bench`` (and, like it, started
with huge pages for the allocator; the workers inherit the setting, both sides alike)."""
import sys

from meditron_jax import hostinfo

hostinfo.reexec_with_hugepages()

from bench.cli import main  # noqa: E402  (after the re-exec: nothing imported twice)

sys.exit(main())
