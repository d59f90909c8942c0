"""Sampling: the decoding engine, the next-token rules, the decoding batch, CPU packing, int8,
speculative decoding, and writing samples to folders."""
