"""``meditron-jax serve``: an OpenAI-compatible HTTP server over the continuous-batching
engine (:mod:`infer.batching`).

The top layer, beside ``cli/``, ``bench/`` and ``demo/``: it may import ``infer``,
``sharding`` and ``meditron_jax``; only ``cli/main.py`` imports it.

* :mod:`serve.protocol`: request bodies checked field by field (HTTP 400 with an
  OpenAI-style error body) and response objects built.
* :mod:`serve.scoring`: prompt log-probabilities (``echo`` with ``logprobs``).
* :mod:`serve.app`: the FastAPI application and the bridge to the engine's thread.
* :mod:`serve.cli`: the command (options, binding, SIGTERM).
"""
