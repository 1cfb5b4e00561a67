"""One JSON line of the version-sensitive behaviours of the running transformers, in
seconds: what ``./kvq compat --probe`` records per release, for bisection. Each value is an
observation, not a verdict (the tests check the expectation table).

    python -m kvcache_repro.releases.probe            # in a release's environment
"""
from __future__ import annotations

import json
import sys
import traceback

import torch

from kvcache_repro.backends import caches, generation
from kvcache_repro.backends.matrix import BACKENDS
from kvcache_repro.backends.models import kv_geometry, tiny_model

FAMILIES = ("llama", "gemma", "stablelm", "dbrx", "cohere", "olmo", "mistral", "recurrentgemma")


def _short(error: BaseException) -> str:
    return f"{type(error).__name__}: {str(error).splitlines()[0][:160] if str(error) else ''}"


def _ids(batch: int, n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 200, (batch, n), generator=torch.Generator().manual_seed(seed))


def family_behaviour(family: str, backend: str = "quanto4") -> str:
    settings, ids = caches.QuantSettings(q_group_size=32, residual_length=16), _ids(2, 32)
    try:
        model = tiny_model(family)
    except Exception as error:  # noqa: BLE001
        return f"harness: config fails: {_short(error)}"
    try:
        generation.generate(model, ids, BACKENDS["none"], settings, 24)
    except Exception as error:  # noqa: BLE001
        return f"harness: unquantized run fails: {_short(error)}"
    try:
        run = generation.generate(model, ids, BACKENDS[backend], settings, 24)
    except ValueError as error:
        return "rejected" if caches.is_rejection(error) else f"error: {_short(error)}"
    except Exception as error:  # noqa: BLE001
        return f"error: {_short(error)}"
    layers, quantized = kv_geometry(model).layers, caches.quantized_layer_count(run.cache)
    return "quantizes" if quantized == layers else f"runs, {quantized} of {layers} layers quantized"


def teacher_forced_uses_cache(backend: str = "quanto4") -> str:
    """Does model(..., <cache_kwarg>=cache) fill the cache the harness passed?"""
    model = tiny_model("llama")
    cache = caches.build_cache(BACKENDS[backend], model.config, caches.QuantSettings(32, 16))
    with torch.inference_mode():
        model(_ids(1, 16), **{caches.cache_kwarg(): cache, "use_cache": True})
    kwarg = caches.cache_kwarg()
    return f"yes ({kwarg}=)" if cache.get_seq_length() else f"no: {kwarg}= ignored (0 tokens)"


def forward_cache_params() -> str:
    import inspect

    from transformers import LlamaModel

    params = inspect.signature(LlamaModel.forward).parameters
    return ",".join(p for p in ("cache", "past_key_values") if p in params) or "neither"


def cache_config_change() -> str:
    """What generate() changed in the caller's hqq4 cache_config ("" when nothing)."""
    config = caches.cache_config(BACKENDS["hqq4"], caches.QuantSettings(32, 16))
    before = dict(config)
    generation.generate_with_cache_config(tiny_model("llama"), _ids(1, 16), config, 4)
    if config == before:
        return ""
    removed, added = sorted(set(before) - set(config)), sorted(set(config) - set(before))
    changed = sorted(k for k in set(before) & set(config) if before[k] != config[k])
    return f"removed {removed}, added {added}, changed {changed}"


def beam_reorder_errors() -> torch.Tensor:
    """Per beam, the largest difference between a near-lossless quantized cache (hqq 8-bit)
    and the unquantized one after 20 decode steps (two flushes at residual 8), a reorder
    (beams 1 and 3 die, beam 2 forks) and one more step; a stale quantized store is O(1) off."""
    model = tiny_model("llama")
    settings = caches.QuantSettings(q_group_size=32, residual_length=8)
    g = torch.Generator().manual_seed(0)
    shape = lambda s: (4, 2, s, 16)  # noqa: E731  (batch of 4 beams, 2 kv heads, head_dim 16)
    steps = [torch.randn(shape(16), generator=g)] + [torch.randn(shape(1), generator=g) for _ in range(20)]
    last = torch.randn(shape(1), generator=g)
    outputs = {}
    for name in ("none", "hqq8-axis1"):
        cache = caches.build_cache(BACKENDS[name], model.config, settings)
        for x in steps:
            caches.update_layer(cache, 0, x, x)
        caches.reorder(cache, torch.tensor([2, 2, 0, 3]))
        outputs[name], _ = caches.update_layer(cache, 0, last, last)
    return (outputs["hqq8-axis1"] - outputs["none"]).abs().amax(dim=(1, 2, 3))


def main() -> int:
    import transformers

    out: dict[str, str] = {"transformers": transformers.__version__}
    probes = {
        "backends": lambda: ",".join(caches.available_backends()),
        "forward_params": forward_cache_params,
        "teacher_forced_cache_used": teacher_forced_uses_cache,
        "cache_config_untouched": lambda: f"no: {c}" if (c := cache_config_change()) else "yes",
        "beam_reorder": lambda: "yes" if bool(((e := beam_reorder_errors()) < 0.05).all())
        else f"no: max error per beam {[round(x, 3) for x in e.tolist()]}",
        **{f"family:{f}": (lambda f=f: family_behaviour(f)) for f in FAMILIES},
    }
    for name, probe in probes.items():
        try:
            out[name] = probe()
        except Exception as error:  # noqa: BLE001
            out[name] = f"probe failed: {_short(error)}"
            traceback.print_exc(file=sys.stderr)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
