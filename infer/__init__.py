"""Generation, scoring, sweeps and evaluation (peer of ``train``; never imports it)."""
