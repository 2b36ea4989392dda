"""Backend-specific attention kernels behind one signature (q [B,T,N,H], k/v [B,S,K,H],
segment ids [B,T]; 0 = padding). Only :mod:`~meditron_jax.kernels.splash` (Pallas TPU)
so far; the model does not call it yet."""
