"""What a quantized cache must do, on a tiny seeded Llama: flush its residual at
``residual_length``, count every token, leave the first generated token exact, lose
accuracy only as bits shrink, and behave in batches as the expectation table says."""
from __future__ import annotations

import pytest
import torch

from kvcache_repro.backends import caches, generation
from kvcache_repro.backends.matrix import BACKENDS
from kvcache_repro.backends.models import tiny_model
from kvcache_repro.measure import quality
from kvcache_repro.verdicts import diagnosis, expectations

SETTINGS = caches.QuantSettings(q_group_size=32, residual_length=16)
PROMPT = 16


def _prompt(batch: int, length: int = PROMPT, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


def _generate(spec, new_tokens: int, batch: int = 2, ids=None):
    """``spec``'s run on the tiny Llama (skipped where the combination cannot work at all)."""
    if spec.broken:
        pytest.skip(spec.broken)
    ids = _prompt(batch) if ids is None else ids
    return generation.generate(tiny_model("llama"), ids, spec, SETTINGS, new_tokens)


@pytest.mark.parametrize("new_tokens", [2, 16, 17, 18, 33, 34])
def test_residual_flushes_at_residual_length(group_wise_backend, new_tokens):
    """``new_tokens - 1`` tokens go through the cache after the prompt, each into the residual,
    which is quantized away when it would reach ``residual_length`` (QuantizedLayer.update): it
    holds ``(new_tokens - 1) % residual_length`` tokens, never ``residual_length`` or more."""
    run = _generate(group_wise_backend, new_tokens)
    for layer in range(len(caches.cache_layers(run.cache))):
        assert caches.residual_tokens(run.cache, layer) == (new_tokens - 1) % SETTINGS.residual_length


@pytest.mark.parametrize("step", [8, 16])
def test_multi_token_forwards_flush_as_the_expectation_table_says(group_wise_backend, step):
    """The accuracy tables feed 16 tokens per forward where that flushes after the same tokens
    as one per forward: measured on this transformers' layer, as expectations.multi_token_flush."""
    if group_wise_backend.broken:
        pytest.skip(group_wise_backend.broken)
    config = tiny_model("llama").config
    one, many = (caches.flush_lengths(group_wise_backend, config, SETTINGS, PROMPT, PROMPT + 96, n)
                 for n in (1, step))
    observed = "same" if many == one else "later" if len(many) < len(one) else f"other: {many} vs {one}"
    assert one == list(range(PROMPT, PROMPT + 97, SETTINGS.residual_length)), one
    assert observed == expectations.multi_token_flush(), expectations.differs(
        expectations.MULTI_TOKEN_FLUSH, None,
        f"{step}-token forwards flush at {many}, 1-token at {one}: {observed!r}",
        value=observed if observed in ("same", "later") else None)


@pytest.mark.needs_backends("quanto4", "hqq4")
def test_multi_token_forwards_give_the_logits_of_single_tokens():
    """Where the flushes coincide, a 16-token forward sees the keys of 16 single-token ones:
    logits equal up to rounding. Measured max differences (R 16): quanto4, hqq4-axis1 2.4e-7;
    hqq4 5.8e-4 (axis 0 mixes rows); a step breaking the schedule (12, 32): 5.5e-3 to 1.9e-2."""
    if expectations.multi_token_flush() != "same":
        pytest.skip("this transformers flushes later with multi-token forwards; "
                    "the harness uses 1-token steps")
    model, ids = tiny_model("llama"), _prompt(2, 96, seed=5)
    for name, atol in (("quanto4", 1e-5), ("hqq4-axis1", 1e-5), ("hqq4", 2e-3)):
        one, many = (generation.teacher_forced_logits(model, ids, BACKENDS[name], SETTINGS, 32, step)
                     for step in (1, 16))
        assert one.shape == many.shape
        diff = float((one - many).abs().max())
        assert torch.allclose(one, many, atol=atol, rtol=0), f"{name}: max diff {diff:.2e}"


@pytest.mark.parametrize("new_tokens", [1, 7, 40])
def test_seq_length_counts_every_token(quantized_backend, new_tokens):
    assert _generate(quantized_backend, new_tokens).cache.get_seq_length() == PROMPT + new_tokens - 1


def test_first_generated_token_is_exact(quantized_backend, batch_size):
    """Prefill attends over the full-precision prompt, so the first step's logits are
    bitwise those of the unquantized run."""
    run = _generate(quantized_backend, 3, batch_size)
    reference = _generate(BACKENDS["none"], 3, batch_size)
    assert torch.equal(run.scores[0], reference.scores[0])
    assert torch.equal(run.new_tokens[:, 0], reference.new_tokens[:, 0])


@pytest.fixture(scope="module")
def teacher_forced():
    """Tiny llama, 2 x 96 tokens, 32 prefilled and 64 decoded through each cache."""
    model, ids = tiny_model("llama"), _prompt(2, 96, seed=5)
    reference = generation.teacher_forced_logits(model, ids, BACKENDS["none"], SETTINGS, 32)

    def measure(name):
        # diagnosed from the cache first: a KL of exactly 0.0 at every nbits must say whether
        # the cache was ignored, held nothing quantized, or was not read
        logits, cache = diagnosis.teacher_forced(model, ids, BACKENDS[name], SETTINGS, 32)
        diagnosis.assert_quantized(BACKENDS[name], cache, "teacher-forced", passed_in=True,
                                   logits=logits, reference=reference)
        return quality.compare_logits(reference, logits, ids[:, 32:])

    return measure


@pytest.mark.parametrize("family_bits", [("quanto", [2, 4]), ("hqq", [1, 2, 3, 4, 8]),
                                         ("hqq-axis1", [1, 2, 4, 8])], ids=lambda v: v[0])
def test_teacher_forced_kl_falls_as_nbits_rises(teacher_forced, family_bits):
    prefix, bits = family_bits
    base, _, suffix = prefix.partition("-")
    if base not in {BACKENDS[n].backend for n in caches.available_backends()}:
        pytest.skip(f"transformers refuses the installed {base} release (test_version_expectations.py::"
                    "test_transformers_builds_a_cache_with_the_installed_quantizer)")
    kls = [teacher_forced(f"{base}{n}{'-' + suffix if suffix else ''}").kl for n in bits]
    assert all(a > b for a, b in zip(kls, kls[1:])), f"{prefix} KL by nbits {bits}: {kls}"


def test_hqq_8bit_is_near_lossless(teacher_forced):
    """KL is second order in the logit perturbation, first order in the step; 8 bits shrink the
    step (2^8-1)/(2^4-1) = 17x against 4 bits, so KL ~289x. 10x slack for non-uniform rounding;
    top-1 must agree."""
    kl4, q8 = teacher_forced("hqq4").kl, teacher_forced("hqq8")
    assert q8.kl <= kl4 * (15 / 255) ** 2 * 10, (q8.kl, kl4)
    assert q8.top1_agreement == 1.0


def test_batch_invariance_matches_the_expectation_table(quantized_backend):
    ids = _prompt(4)
    batched = _generate(quantized_backend, 40, ids=ids)
    token_diffs, logit_diff = 0, 0.0
    for row in range(ids.shape[0]):
        alone = _generate(quantized_backend, 40, ids=ids[row:row + 1])
        token_diffs += int((batched.sequences[row] != alone.sequences[0]).sum())
        # min_new_tokens masks EOS with -inf in both runs: compare finite logits only
        a, b = torch.stack(batched.scores)[:, row], torch.stack(alone.scores)[:, 0]
        finite = torch.isfinite(a) & torch.isfinite(b)
        logit_diff = max(logit_diff, float((a - b)[finite].abs().max()))
    observed = "no" if token_diffs else ("exact" if logit_diff <= 1e-5 else "tokens")
    if observed == "tokens" and logit_diff > 1e-2:
        observed = "no"
    assert observed == expectations.batch_invariance(quantized_backend), expectations.differs(
        expectations.BATCH_INVARIANCE, quantized_backend.name,
        f"{observed!r} ({token_diffs} tokens differ, max logit diff {logit_diff:.2e})", value=observed)


@pytest.mark.parametrize("spec_name", ["quanto4", "hqq4"])
def test_indivisible_prompt_gets_a_clear_error_before_generate(spec_name, monkeypatch):
    """G=64 and a 7-token prompt: H*S*D = 2*7*16 = 224 is not a multiple of 64."""
    model = tiny_model("llama")
    called = []
    monkeypatch.setattr(model, "generate", lambda *a, **k: called.append(1))
    with pytest.raises(caches.GroupSizeError, match=r"q_group_size 64 does not divide .* = 224"):
        generation.generate(model, _prompt(1, 7), BACKENDS[spec_name], caches.QuantSettings(64, 16), 4)
    assert not called, "generate() ran before the shape check"


def test_the_cache_quantizes_along_the_axis_it_was_asked(group_wise_backend):
    """The axis the stored tensors were grouped along (quanto's ``axis``, hqq's meta["axis"]) is
    the one asked for: an ignored axis fails here by name, not later as a group-size ValueError.
    Both axes divide G in these shapes, so an ignored axis cannot crash first."""
    from transformers import LlamaConfig

    from kvcache_repro.backends import offline

    config = LlamaConfig(**offline.arch_config_kwargs("dry-tiny"))  # 2 KV heads x 32
    spec = group_wise_backend
    cache = caches.build_cache(spec, config, caches.QuantSettings(q_group_size=64, residual_length=16))
    k = torch.randn(2, 2, 16, 32, generator=torch.Generator().manual_seed(0))
    cache.update(k, k.clone(), 0)
    q = caches.layer_storage(caches.cache_layers(cache)[0]).quantized_keys
    axis = q.axis if spec.backend == "quanto" else q[1]["axis"]
    assert axis % k.dim() == spec.axis % k.dim(), (
        f"{spec.name}: asked for axis {spec.axis}, the cache quantized along axis {axis}")


@pytest.mark.parametrize("name", ["quanto4", "hqq4", "fp8"])
def test_a_layer_s_store_changes_identity_exactly_when_it_requantizes(name):
    """caches.quantized_stores, which tells the decode-step peak's quiet steps: a group-wise
    layer's store changes exactly at the updates that empty its residual; fp8 appends each
    token to its codes and never re-quantizes (every step is quiet)."""
    from transformers import LlamaConfig

    from kvcache_repro.backends import offline
    from kvcache_repro.backends.kinds import KINDS

    spec = BACKENDS[name]
    if spec.broken:
        pytest.skip(spec.broken)
    cache = caches.build_cache(spec, LlamaConfig(**offline.arch_config_kwargs("dry-tiny")), SETTINGS)
    g = torch.Generator().manual_seed(0)
    k = torch.randn(2, 2, PROMPT, 32, generator=g)
    cache.update(k, k.clone(), 0)
    changed, flushed = [], []
    for step in range(1, 40):
        before = caches.quantized_stores(cache)
        t = torch.randn(2, 2, 1, 32, generator=g)
        cache.update(t, t.clone(), 0)
        changed += [step] * (caches.quantized_stores(cache) != before)
        flushed += [step] * (KINDS[spec.backend].group_wise and caches.residual_tokens(cache) == 0)
    assert changed == flushed and (flushed or name == "fp8"), (changed, flushed)
