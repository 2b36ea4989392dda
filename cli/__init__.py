"""The ``meditron-jax`` command and ``plan``: the top layer, above ``train`` and ``infer``,
which it may both import (nothing below imports it)."""
