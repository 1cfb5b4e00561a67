"""Accuracy of a quantized cache against the unquantized one, teacher-forced: both runs
see the same tokens, so differences come only from the cache."""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from kvcache_repro.backends import caches, generation
from kvcache_repro.backends.matrix import BACKENDS, BackendSpec


@dataclass(frozen=True)
class Quality:
    kl: float  # mean KL(reference || candidate), nats per token
    top1_agreement: float  # fraction of positions where the argmax matches
    perplexity: float  # of the candidate on the real next tokens
    reference_perplexity: float
    nonfinite: str = ""  # where the candidate's logits first stopped being finite ("" : never)
    # Relative logit error (logit_error) of the positions computed while the layers held fewer
    # than SPLIT quantized tokens, and of those past it (nan: no such position)
    logit_error: float = math.nan
    logit_error_past: float = math.nan


# Positions are grouped at this many quantized tokens: a regression past a few hundred shows
# only in the second group (the seed's accuracy claim is about 1,000 tokens).
SPLIT = 512


def first_nonfinite(logits: torch.Tensor, prefill: int, flushes: list[int] | None = None, step: int = 1) -> str:
    """Where (batch, n, vocab) teacher-forced logits first hold a NaN or inf ("" : nowhere);
    position 0 is the prefill's last token; ``flushes``: caches.flush_lengths, counted as
    quantized_seen does (a flush inside a position's own forward came after its attention)."""
    bad = ~torch.isfinite(logits).all(dim=-1)  # (batch, n)
    if not bool(bad.any()):
        return ""
    position = int(bad.any(dim=0).nonzero()[0])
    rows = int(bad[:, position].sum())
    where = ("the prefill (logits of the last prompt token)" if position == 0
             else f"decoded position {position} (sequence length {prefill + position})")
    if flushes is not None and position > 0:
        done = sum(1 for length in flushes if prefill < length <= prefill + (position - 1) // step * step)
        where += f", after {done} flush{'es' if done != 1 else ''} of the residual" if done else ", before the first flush"
    return f"{where}, in {rows} of {logits.shape[0]} rows"


def compare_logits(reference: torch.Tensor, candidate: torch.Tensor, targets: torch.Tensor,
                   chunk: int = 64) -> Quality:
    """``reference``/``candidate``: (batch, n, vocab) logits predicting ``targets`` (batch, n),
    ``chunk`` positions at a time (a whole log-softmax at the seed's length: 0.8 GB a copy)."""
    kl = agree = ref_nll = cand_nll = 0.0
    for i in range(0, targets.shape[1], chunk):
        ref_logp = torch.log_softmax(reference[:, i:i + chunk].float(), dim=-1)
        cand_logp = torch.log_softmax(candidate[:, i:i + chunk].float(), dim=-1)
        t = targets[:, i:i + chunk].unsqueeze(-1)
        kl += float((ref_logp.exp() * (ref_logp - cand_logp)).sum())
        agree += float((ref_logp.argmax(-1) == cand_logp.argmax(-1)).sum())
        ref_nll -= float(ref_logp.gather(-1, t).sum())
        cand_nll -= float(cand_logp.gather(-1, t).sum())
    n = targets.numel()
    return Quality(max(kl / n, 0.0), agree / n, math.exp(cand_nll / n), math.exp(ref_nll / n))


def logit_error(reference: torch.Tensor, candidate: torch.Tensor, positions: list[int]) -> float:
    """||candidate - reference|| / ||reference - its mean over the vocabulary|| over ``positions``
    of (batch, n, vocab) logits, in float64: how far the cache moved the logits, relative to how
    much they vary. Unlike KL it does not vanish on a random model's near-uniform outputs."""
    if not positions:
        return math.nan
    idx = torch.tensor(positions)
    ref, cand = reference[:, idx].double(), candidate[:, idx].double()
    spread = (ref - ref.mean(dim=-1, keepdim=True)).pow(2).sum()
    return float(((cand - ref).pow(2).sum() / spread).sqrt())


def quantized_seen(spec: BackendSpec, model_config, settings: caches.QuantSettings, prefill: int, n: int,
                   step: int) -> list[int]:
    """Per teacher-forced position (0: the prefill's last token), how many quantized tokens each
    layer held while it was computed: the last flush before its forward (fp8: every token before it)."""
    starts = [0] + [prefill + (p - 1) // step * step for p in range(1, n - prefill)]
    if not spec.quantized:
        return [0] * len(starts)
    if not spec.group_wise:
        return starts
    flushes = caches.flush_lengths(spec, model_config, settings, prefill, n, step)
    return [max((f for f in flushes if f <= a), default=0) for a in starts]


def teacher_forced_quality(model, input_ids: torch.Tensor, spec: BackendSpec, settings: caches.QuantSettings,
                           prefill: int, reference: torch.Tensor | None = None, step: int = 1,
                           grouped: bool = False) -> Quality:
    """Quality of ``spec`` against the unquantized cache (``reference``: its logits, if known);
    ``grouped``: the logit error before and past SPLIT quantized tokens too (the tiny setups)."""
    if reference is None:
        reference = generation.teacher_forced_logits(model, input_ids, BACKENDS["none"], settings, prefill, step)
    candidate = generation.teacher_forced_logits(model, input_ids, spec, settings, prefill, step)
    quality = compare_logits(reference, candidate, input_ids[:, prefill:])
    if grouped:
        seen = quantized_seen(spec, model.config, settings, prefill, input_ids.shape[1], step)
        quality = replace(quality,
                          logit_error=logit_error(reference, candidate, [p for p, k in enumerate(seen) if k < SPLIT]),
                          logit_error_past=logit_error(reference, candidate, [p for p, k in enumerate(seen) if k >= SPLIT]))
    flushes = (caches.flush_lengths(spec, model.config, settings, prefill, input_ids.shape[1], step)
               if spec.group_wise else None)
    where = first_nonfinite(candidate, prefill, flushes, step)
    return replace(quality, nonfinite=where) if where else quality


# ---- the real-model accuracy run -------------------------------------------------------

@dataclass(frozen=True)
class AccuracySetup:
    """Teacher-forced protocol on the small real model, the seed's G 128 and R 64. Quantized
    lengths stay multiples of 64 tokens: G 128 divides SmolLM2's K/V rows (192 values per
    token), hqq axis-1 packing stays whole at 1 bit. ``step`` decoded tokens per forward
    (the same logits as one per forward where the flush schedule allows: effective_step)."""

    name: str
    backends: tuple[str, ...]
    rows: int = 2
    prefill: int = 64
    decode: int = 128
    step: int = 16
    proxy: str = ""  # how this setup differs from the seed's, said beside its verdicts
    settings: caches.QuantSettings = caches.SEED_SETTINGS
    # "real": SmolLM2 on a text; "tiny": the tiny random Llama on seeded random ids, whose
    # logit error (not KL: its outputs are near-uniform) is compared, before and past SPLIT
    model: str = "real"
    dtype: str = "float32"  # of the model and so of its cache

    def key(self) -> str:
        # No step: the step does not change the logits (tests/test_accuracy.py shows it).
        s = self.settings
        return f"rows{self.rows}-prefill{self.prefill}-decode{self.decode}-G{s.q_group_size}-R{s.residual_length}"

    @property
    def metrics(self) -> tuple[str, ...]:
        """What the setup's table stores per backend."""
        return (("logit_error", "logit_error_past_512") if self.model == "tiny"
                else ("kl", "top1_agreement", "perplexity_ratio"))

    def describe(self) -> str:
        what = {"real": "SmolLM2", "tiny": f"tiny random Llama ({self.dtype})"}.get(self.model, f"your model ({self.dtype})")
        return (f"{what} teacher-forced, {self.rows} rows x ({self.prefill} prefilled + {self.decode} decoded) "
                f"tokens, {self.decode // self.settings.residual_length} flushes, "
                f"G {self.settings.q_group_size} R {self.settings.residual_length}")


ALL_QUANTIZED = tuple(b.name for b in BACKENDS.values() if b.quantized and not b.broken)
# 1 bit is noise (perplexity x1,500 and more): "full" keeps it, the default tier saves its two runs.
WITHOUT_1_BIT = tuple(name for name in ALL_QUANTIZED if BACKENDS[name].nbits != 1)
_TINY = caches.QuantSettings(q_group_size=32, residual_length=64)  # G 32: the tiny K/V rows (32 values a token)
# "core" (default tier, ~40 s): every backend from 2 bits up, 2 flushes. "tiny-<dtype>" (default
# tier, ~4 s each): every backend from 2 bits up in float32, float16 and bfloat16, 16 flushes
# past 512 quantized tokens. "seed" (slow, ~7 min
# at 1 thread: hqq re-optimizes the whole history at each of 16 flushes): the seed's length
# and 4 bits, 4 texts. "full" (slow): core one token per forward, what its 16-token step matches.
ACCURACY_SETUPS = {s.name: s for s in (
    AccuracySetup("core", WITHOUT_1_BIT,
                  proxy="short-context proxy: 128 decoded tokens (2 flushes), not the seed's 1,000"),
    AccuracySetup("seed", ("quanto4", "hqq4", "hqq4-axis1"), rows=4, decode=1024),
    AccuracySetup("full", ALL_QUANTIZED, step=1),
    *(AccuracySetup(f"tiny-{short}", WITHOUT_1_BIT, decode=1024, settings=_TINY, model="tiny", dtype=dtype,
                    proxy="tiny random Llama: the cache's half-precision and long-context paths, not a model's quality")
      for short, dtype in (("fp32", "float32"), ("fp16", "float16"), ("bf16", "bfloat16"))),
)}


def corpus_ids(tokenizer, rows: int, length: int) -> torch.Tensor:
    """``rows`` x ``length`` token ids of the stdlib's help topics (pydoc_data.topics), a topic a row."""
    from pydoc_data.topics import topics

    out = []
    for name in sorted(topics):
        ids = tokenizer(topics[name], add_special_tokens=False)["input_ids"]
        if len(ids) >= length:
            out.append(ids[:length])
        if len(out) == rows:
            return torch.tensor(out)
    raise ValueError(f"pydoc_data.topics has fewer than {rows} topics of {length} tokens")


def effective_step(model, setup: AccuracySetup) -> int:
    """``setup.step`` where this transformers flushes after the same tokens with it as one
    token per forward, else 1."""
    if setup.step == 1:
        return 1
    total = setup.prefill + setup.decode
    available = caches.available_backends()
    group_wise = [n for n in setup.backends if BACKENDS[n].group_wise and n in available]
    if not group_wise:
        return setup.step  # no group-wise backend runs here: nothing flushes
    probe = BACKENDS[group_wise[0]]
    same = (caches.flush_lengths(probe, model.config, setup.settings, setup.prefill, total, setup.step)
            == caches.flush_lengths(probe, model.config, setup.settings, setup.prefill, total, 1))
    return setup.step if same else 1


def accuracy_table(model, tokenizer, setup: AccuracySetup, step: int) -> dict[str, Quality]:
    """Quality of each of the setup's backends this transformers has, ``step`` tokens per forward
    (no tokenizer: seeded random ids of the tiny vocabulary)."""
    n = setup.prefill + setup.decode
    ids = (corpus_ids(tokenizer, setup.rows, n) if tokenizer is not None
           else torch.randint(3, model.config.vocab_size, (setup.rows, n), generator=torch.Generator().manual_seed(0)))
    ids = ids.to(model.device)
    reference = generation.teacher_forced_logits(model, ids, BACKENDS["none"], setup.settings, setup.prefill, step)
    available = caches.available_backends()
    return {name: teacher_forced_quality(model, ids, BACKENDS[name], setup.settings, setup.prefill, reference, step,
                                         grouped=setup.model == "tiny")
            for name in setup.backends if name in available}
