"""Quantizer correctness for quanto and hqq, through the code path transformers uses
(a cache layer's prefill quantization and its dequantization on the next step).

The bound is derived, not tuned: both backends are affine quantizers with
round-to-nearest onto a uniform grid ``lo + q*step``, q in {0..2^n-1}, clamped at the
ends. So a value inside [lo, hi] comes back within step/2; a value outside comes back
as the nearest end. quanto's MaxOptimizer sets lo/hi to the group's min/max, so for it
every value is inside and step = (max - min) / (2^n - 1). Float rounding adds at most a
few ulps of the magnitudes involved (``_float_slack``).
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings as hsettings, strategies as st

from kvcache_repro.backends import caches

from kvcache_repro.measure import quantizers
from kvcache_repro.backends.matrix import BACKENDS, BackendSpec

GROUP = 32
SETTINGS = caches.QuantSettings(q_group_size=GROUP, residual_length=16)
GROUP_WISE = [b for b in BACKENDS.values() if b.group_wise and not b.broken]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]  # float16: the seed's dtype

hypothesis_settings = hsettings(max_examples=15, deadline=None,
                                suppress_health_check=[HealthCheck.function_scoped_fixture])


@st.composite
def kv_tensors(draw, dtype):
    """(batch, kv_heads, seq, head_dim) tensors with a mix of scales, offsets and outliers;
    seq is a multiple of 8 so hqq axis-1 packing (8 groups/byte at 1 bit) always fits."""
    batch = draw(st.integers(1, 3))
    heads = draw(st.sampled_from([1, 2]))
    seq = draw(st.sampled_from([8, 16, 24]))
    head_dim = draw(st.sampled_from([16, 32]))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from([1e-3, 0.1, 1.0, 30.0]))
    offset = draw(st.sampled_from([0.0, 1.0, -50.0]))
    outliers = draw(st.booleans())
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, heads, seq, head_dim, generator=g) * scale + offset
    if outliers:  # a few channels 20x larger, as real keys have
        x[..., :2] *= 20
    return x.to(dtype)


def _quantizable(spec, x) -> bool:
    batch, heads, seq, head_dim = x.shape
    try:
        caches.check_quantizable(spec, SETTINGS, batch=batch, kv_heads=heads, head_dim=head_dim,
                                 prompt_len=seq, new_tokens=1)
    except caches.GroupSizeError:
        return False
    return True


def _float_slack(rt, dtype) -> torch.Tensor:
    """Float rounding a correct quantizer may add, per group. The codes and the restored
    values are computed in ``dtype`` from numbers as large as the group's magnitude M (the
    value, the zero point or shift, their sum and product): three roundings of at most
    eps/2 x M each, and one of the step. Measured worst case over 480 tensors per backend
    in bf16: 1.37 eps x M (quanto4), 1.25 (hqq8). 2 eps x M leaves a margin and keeps the
    check able to fail in bf16 at 8 bits, where M is ~128 steps of a centred group: the
    bound is then ~2.5 steps (it was 4.5 with 4 eps; test_the_bound_catches_three_steps_in_bf16_at_8_bits)."""
    eps = torch.finfo(dtype).eps
    magnitude = torch.maximum(rt.lo.abs(), rt.hi.abs()).maximum(rt.original.abs().amax(dim=1, keepdim=True))
    return 2 * eps * magnitude + 2 * eps * rt.step


def _outside_the_bound(rt, restored, dtype) -> torch.Tensor:
    """Elements inside the grid that came back further than step/2 plus float slack."""
    slack = _float_slack(rt, dtype)
    inside = (rt.original >= rt.lo - slack) & (rt.original <= rt.hi + slack)
    return ((restored - rt.original).abs() > rt.step / 2 + slack) & inside


@pytest.mark.parametrize("spec", GROUP_WISE, ids=lambda s: s.name)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_round_trip_error_bounded_by_group_step(spec: BackendSpec, dtype):
    @hypothesis_settings
    @given(x=kv_tensors(dtype))
    def check(x):
        assume(_quantizable(spec, x))
        rt = quantizers.round_trip(spec, SETTINGS, x)
        err = (rt.restored - rt.original).abs()
        slack = _float_slack(rt, dtype)
        inside = (rt.original >= rt.lo - slack) & (rt.original <= rt.hi + slack)
        # inside the grid: round to nearest
        assert not bool(_outside_the_bound(rt, rt.restored, dtype).any()), (
            f"{spec.name}: max err/step {float((err / rt.step)[inside].max()):.3f} > 0.5 + slack")
        # outside: clamped to the nearest end of the grid
        nearest_end = torch.where(rt.original < rt.lo, rt.lo, rt.hi).expand_as(rt.original)
        assert torch.allclose(rt.restored[~inside], nearest_end[~inside], atol=float(slack.max()))
        # Both grids span the group's range: quanto's MaxOptimizer sets lo/hi to min/max;
        # hqq's proximal optimizer (hqq/core/optimize.py) moves only the zero point and
        # keeps the min-max scale. So the step is (max - min) / (2^n - 1), checked
        # against the data, not against the backend's own metadata (a doubled step fails).
        # Tolerance: hqq inverts the step twice and stores it in the model dtype, each a
        # rounding of <= eps/2: rtol two eps. (In bf16 at 8 bits that cannot tell 255
        # levels from 256, 0.39% apart; float32 can.)
        levels = 2**spec.nbits - 1
        spread = rt.original.amax(1, keepdim=True) - rt.original.amin(1, keepdim=True)
        expected_step = spread / levels
        if spec.backend == "hqq":
            # hqq 0.2.8 guards (hqq/core/quantize.py, Quantizer.quantize): a range of at
            # most 1e-4 gets step 1, and the inverse step is clamped at 2e4.
            expected_step = torch.where(spread <= 1e-4, torch.ones_like(spread), expected_step.clamp(min=1 / 2e4))
        assert torch.allclose(rt.step, expected_step, rtol=2 * torch.finfo(dtype).eps, atol=1e-30), (
            f"{spec.name}: step off the group's (max - min) / {levels} by up to "
            f"{float(((rt.step - expected_step).abs() / expected_step.clamp_min(1e-30)).max()):.2e}")
        if spec.backend == "quanto":
            assert bool(inside.all())  # min-max grid: nothing outside

    check()


@pytest.mark.parametrize("name", ["hqq8", "hqq8-axis1"])
def test_the_bound_catches_three_steps_in_bf16_at_8_bits(name):
    """bf16 has 8 significant bits, so at 8 bits its rounding is worth about a step and the
    slack is large; it must not swallow the check. On a centred bf16 tensor, values
    restored 3 steps off (a quantizer off by 3 codes) fail it at more than half the
    elements (measured 64% hqq8, 70% axis 1; 4 steps: > 99%), and 1 step of bias, which
    bf16 rounding alone can come near, passes. With the former 4 eps slack 3 steps
    flagged nothing and 4 steps 1-2%."""
    x = torch.randn(2, 2, 16, 32, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    rt = quantizers.round_trip(BACKENDS[name], SETTINGS, x)
    assert not bool(_outside_the_bound(rt, rt.restored, torch.bfloat16).any())
    assert not bool(_outside_the_bound(rt, rt.restored + rt.step, torch.bfloat16).any())
    flagged = float(_outside_the_bound(rt, rt.restored + 3 * rt.step, torch.bfloat16).float().mean())
    assert flagged > 0.5, f"3 steps off flagged at only {flagged:.0%} of the elements"


@pytest.mark.parametrize("spec", GROUP_WISE, ids=lambda s: s.name)
def test_packed_storage_has_the_size_nbits_implies(spec: BackendSpec):
    x = torch.randn(2, 2, 16, 32)
    rt = quantizers.round_trip(spec, SETTINGS, x)
    n, groups = x.numel(), x.numel() // GROUP
    if spec.backend == "hqq" and spec.nbits == 3:
        # hqq packs 10 3-bit codes per int32 along the packed dimension, padded to 10:
        # G rows at axis 0 (hqq/core/bitpack.py pack_3bit_32)
        expected = 4 * math.ceil(GROUP / 10) * groups
    else:
        expected = n * spec.nbits // 8
    assert rt.stored.packed == expected
    # one scale and one zero-point/shift per group, in the tensor's dtype
    assert rt.stored.metadata == 2 * groups * x.element_size()


@pytest.mark.parametrize("spec", GROUP_WISE, ids=lambda s: s.name)
def test_values_on_the_grid_come_back_exactly(spec: BackendSpec):
    """Each group holds integer codes times a power-of-two step, including code 0 and the
    top code, so min/max define exactly that grid and every value is representable."""
    levels = 2**spec.nbits - 1
    g = torch.Generator().manual_seed(0)
    shape = (2, 2, 16, 32)
    n_groups = math.prod(shape) // GROUP
    codes = torch.randint(0, levels + 1, (n_groups, GROUP), generator=g).float()
    codes[:, 0], codes[:, 1] = 0, levels
    step = 2.0 ** torch.randint(-6, 2, (n_groups, 1), generator=g).float()
    lo = torch.randint(-8, 8, (n_groups, 1), generator=g).float() * step
    grouped = lo + codes * step
    # lay the groups out the way this backend groups them
    if (spec.backend == "quanto" and spec.axis == 0) or (spec.backend == "hqq" and spec.axis == 1):
        x = grouped.reshape(shape)
    elif spec.backend == "hqq":  # axis 0: groups are columns of reshape(G, -1)
        x = grouped.t().reshape(shape)
    else:
        pytest.skip("quanto axis -1 is not in the default matrix")
    rt = quantizers.round_trip(spec, SETTINGS, x)
    assert torch.equal(rt.restored, rt.original)


@pytest.mark.parametrize(
    "spec, message",
    [
        (BackendSpec("quanto8", "quanto", 8, 0), "`nbits` for `quanto` backend has to be one of [`2`, `4`]"),
        (BackendSpec("quanto4-axis1", "quanto", 4, 1), "`axis_key` for `quanto` backend has to be one of [`0`, `-1`]"),
        (BackendSpec("hqq5", "hqq", 5, 0), "`nbits` for `HQQ` backend has to be one of [`1`, `2`, `3`, `4`, `8`]"),
        (BackendSpec("hqq4-axis2", "hqq", 4, 2), "`axis_key` for `HQQ` backend has to be one of [`0`, `1`]"),
    ],
    ids=lambda v: v.name if isinstance(v, BackendSpec) else "",
)
def test_unsupported_nbits_or_axis_raise_the_documented_error(spec, message):
    """Messages from transformers 5.24 cache_utils.py (QuantoQuantizedLayer/HQQQuantizedLayer)."""
    from kvcache_repro.backends.models import tiny_model

    with pytest.raises(ValueError) as info:
        caches.build_cache(spec, tiny_model("llama").config, SETTINGS)
    assert message in str(info.value)


@pytest.mark.parametrize("spec", [b for b in BACKENDS.values() if b.group_wise], ids=lambda s: s.name)
def test_divisibility_rule_predicts_exactly_which_shapes_the_backend_rejects(spec: BackendSpec):
    """The harness's pre-flight check (caches.check_quantizable) must agree with the
    backend: every shape it lets through quantizes and dequantizes, every shape it stops
    really fails inside quanto/hqq. Shapes: K/V tensors of tiny models, odd and even."""
    outcomes = []
    for batch, heads, seq, head_dim in [(1, 2, 7, 16), (1, 2, 8, 16), (1, 1, 3, 16), (3, 1, 5, 32),
                                        (2, 2, 1, 16), (1, 3, 10, 64), (4, 2, 12, 16)]:
        x = torch.randn(batch, heads, seq, head_dim)
        try:
            caches.check_quantizable(spec, SETTINGS, batch=batch, kv_heads=heads, head_dim=head_dim,
                                     prompt_len=seq, new_tokens=1)
            predicted_ok = True
        except (caches.GroupSizeError, caches.UnsupportedCombination):
            predicted_ok = False
        try:
            _, restored = caches.quantize_once(spec, SETTINGS, x)
            actual_ok = restored.shape == x.shape
        except (AssertionError, ValueError, RuntimeError):
            actual_ok = False
        outcomes.append(((batch, heads, seq, head_dim), predicted_ok, actual_ok))
    wrong = [o for o in outcomes if o[1] != o[2]]
    assert not wrong, f"{spec.name}: (shape, predicted ok, really ok) disagree: {wrong}"
    broken = spec.broken is not None
    assert any(o[2] for o in outcomes) != broken, (
        "hqq3-axis1 started working: drop UnsupportedCombination" if broken
        else "no shape worked at all - the check is vacuous")
