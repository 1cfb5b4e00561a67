"""One JSON line of the version-sensitive behaviours of the running transformers, in
seconds: what ``./kvq compat --probe`` records per release and what bisection compares.
Each value is an observation, not a verdict: the expectation table is checked by the
tests; this is for finding where a behaviour changes.

    python -m kvcache_repro.releases.probe            # in a release's environment
"""
from __future__ import annotations

import json
import sys
import traceback

import torch


def _short(error: BaseException) -> str:
    return f"{type(error).__name__}: {str(error).splitlines()[0][:160] if str(error) else ''}"


def family_behaviour(family: str, backend: str = "quanto4") -> str:
    from kvcache_repro.backends import caches, generation
    from kvcache_repro.backends.matrix import BACKENDS
    from kvcache_repro.backends.models import kv_geometry, tiny_model

    settings = caches.QuantSettings(q_group_size=32, residual_length=16)
    ids = torch.randint(3, 200, (2, 32), generator=torch.Generator().manual_seed(0))
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
    from kvcache_repro.backends import caches
    from kvcache_repro.backends.matrix import BACKENDS
    from kvcache_repro.backends.models import tiny_model

    model = tiny_model("llama")
    cache = caches.build_cache(BACKENDS[backend], model.config, caches.QuantSettings(32, 16))
    ids = torch.randint(3, 200, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        model(ids, **{caches.cache_kwarg(): cache, "use_cache": True})
    n = cache.get_seq_length()
    return f"yes ({caches.cache_kwarg()}=)" if n else f"no: {caches.cache_kwarg()}= ignored (0 tokens)"


def forward_cache_params() -> str:
    import inspect

    from transformers import LlamaModel

    params = inspect.signature(LlamaModel.forward).parameters
    return ",".join(p for p in ("cache", "past_key_values") if p in params) or "neither"


def cache_config_untouched() -> str:
    from kvcache_repro.backends import caches, generation
    from kvcache_repro.backends.matrix import BACKENDS
    from kvcache_repro.backends.models import tiny_model

    config = caches.cache_config(BACKENDS["hqq4"], caches.QuantSettings(32, 16))
    before = dict(config)
    ids = torch.randint(3, 200, (1, 16), generator=torch.Generator().manual_seed(0))
    generation.generate_with_cache_config(tiny_model("llama"), ids, config, 4)
    if config == before:
        return "yes"
    removed, added = sorted(set(before) - set(config)), sorted(set(config) - set(before))
    changed = sorted(k for k in set(before) & set(config) if before[k] != config[k])
    return f"no: removed {removed}, added {added}, changed {changed}"


def beam_reorder_reaches_store() -> str:
    """tests/test_version_expectations.py::test_beam_reorder_reaches_the_quantized_store, as a value."""
    from kvcache_repro.backends import caches
    from kvcache_repro.backends.matrix import BACKENDS
    from kvcache_repro.backends.models import tiny_model

    model = tiny_model("llama")
    settings = caches.QuantSettings(q_group_size=32, residual_length=8)
    g = torch.Generator().manual_seed(0)
    steps = [torch.randn(4, 2, 16, 16, generator=g)] + [torch.randn(4, 2, 1, 16, generator=g) for _ in range(20)]
    last = torch.randn(4, 2, 1, 16, generator=g)
    outputs = {}
    for name in ("none", "hqq8-axis1"):
        cache = caches.build_cache(BACKENDS[name], model.config, settings)
        for x in steps:
            caches.update_layer(cache, 0, x, x)
        caches.reorder(cache, torch.tensor([2, 2, 0, 3]))
        outputs[name], _ = caches.update_layer(cache, 0, last, last)
    err = (outputs["hqq8-axis1"] - outputs["none"]).abs().amax(dim=(1, 2, 3))
    return "yes" if bool((err < 0.05).all()) else f"no: max error per beam {[round(e, 3) for e in err.tolist()]}"


def main() -> int:
    import transformers

    from kvcache_repro.backends import caches

    out: dict[str, str] = {"transformers": transformers.__version__}
    probes = {
        "backends": lambda: ",".join(caches.available_backends()),
        "forward_params": forward_cache_params,
        "teacher_forced_cache_used": teacher_forced_uses_cache,
        "cache_config_untouched": cache_config_untouched,
        "beam_reorder": beam_reorder_reaches_store,
        **{f"family:{f}": (lambda f=f: family_behaviour(f)) for f in
           ("llama", "gemma", "stablelm", "dbrx", "cohere", "olmo", "mistral", "recurrentgemma")},
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
