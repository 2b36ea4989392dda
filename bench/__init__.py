"""Side-by-side benchmarks against transformers and the machine's ceilings."""
