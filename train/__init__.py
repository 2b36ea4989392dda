"""Continued pretraining and fine-tuning (peer of ``infer``; never imports it)."""
