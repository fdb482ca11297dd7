"""Layers over the flat batch: paged attention and the batched sampler."""
