"""Turning numbers into verdicts: stored baselines and their bands, per-release values, the seed's claims, version-keyed expectations, diagnosis of a cache that did not quantize."""
