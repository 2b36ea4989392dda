"""Checkpoints in and out: Hugging Face snapshots (:mod:`.hf_io`, :mod:`.hf_keys`,
:mod:`.convert`), the native Orbax format (:mod:`.checkpoint`), their integrity
(:mod:`.checksums`), loading either for a run (:mod:`.loading`) and the block-wise
tensor reads both use (:mod:`.tensor_blocks`)."""
