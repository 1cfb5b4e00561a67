"""Checking other releases of transformers, torch, optimum-quanto and hqq: specs, cached environments, the release matrix, behaviour probes."""
