"""Accuracy of a quantized cache against the unquantized one, teacher-forced.

Both runs see the same tokens, so differences come only from the cache. Metrics per
predicted position, averaged: KL(unquantized || quantized) in nats, top-1 agreement,
and perplexity of the actual next tokens.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import caches, generation
from .matrix import BACKENDS, BackendSpec


@dataclass(frozen=True)
class Quality:
    kl: float  # mean KL(reference || candidate), nats per token
    top1_agreement: float  # fraction of positions where the argmax matches
    perplexity: float  # of the candidate on the real next tokens
    reference_perplexity: float


def compare_logits(reference: torch.Tensor, candidate: torch.Tensor, targets: torch.Tensor) -> Quality:
    """``reference``/``candidate``: (batch, n, vocab) logits predicting ``targets`` (batch, n)."""
    ref_logp = torch.log_softmax(reference.float(), dim=-1)
    cand_logp = torch.log_softmax(candidate.float(), dim=-1)
    kl = (ref_logp.exp() * (ref_logp - cand_logp)).sum(-1).mean()
    agree = (reference.argmax(-1) == candidate.argmax(-1)).float().mean()

    def ppl(logp):
        return float(torch.exp(-logp.gather(-1, targets.unsqueeze(-1)).mean()))

    return Quality(float(kl.clamp(min=0.0)), float(agree), ppl(cand_logp), ppl(ref_logp))


def teacher_forced_quality(model, input_ids: torch.Tensor, spec: BackendSpec, settings: caches.QuantSettings,
                           prefill: int, reference: torch.Tensor | None = None) -> Quality:
    """Quality of ``spec`` against the unquantized cache on ``input_ids``. Pass the
    unquantized logits as ``reference`` to reuse them across backends."""
    if reference is None:
        reference = generation.teacher_forced_logits(model, input_ids, BACKENDS["none"], settings, prefill)
    candidate = generation.teacher_forced_logits(model, input_ids, spec, settings, prefill)
    return compare_logits(reference, candidate, input_ids[:, prefill:])


# ---- the real-model accuracy run -------------------------------------------------------

@dataclass(frozen=True)
class AccuracySetup:
    """Teacher-forced protocol on the small real model. The seed's G=128 and residual 64;
    prefill and decode lengths keep every quantized length a multiple of 64 tokens, so
    G=128 divides SmolLM2's K/V rows (3 heads x 64 dims = 192 values per token) and hqq
    axis-1 packing stays whole at 1 bit. ``decode - 1`` tokens go through the cache one at
    a time; more than ``residual_length`` of them so the residual flushes at least once."""

    name: str
    backends: tuple[str, ...]
    rows: int = 2
    prefill: int = 128
    decode: int = 128
    settings: caches.QuantSettings = caches.QuantSettings(q_group_size=128, residual_length=64)

    def key(self) -> str:
        s = self.settings
        return f"rows{self.rows}-prefill{self.prefill}-decode{self.decode}-G{s.q_group_size}-R{s.residual_length}"


# "core" (default, ~1 min on 2 cores): the seed's axis 0 at every nbits both backends
# share, plus hqq 3/8 and fp8. "full" (slow): every backend x nbits x axis.
ACCURACY_SETUPS = {s.name: s for s in (
    AccuracySetup("core", ("quanto2", "quanto4", "hqq2", "hqq3", "hqq4", "hqq8", "fp8"), decode=72),
    AccuracySetup("full", tuple(b.name for b in BACKENDS.values()
                                if b.quantized and not b.broken)),
)}


def corpus_ids(tokenizer, rows: int, length: int) -> torch.Tensor:
    """``rows`` x ``length`` token ids from a fixed English text that ships with Python
    (pydoc_data.topics, the stdlib's help topics), each row from a different topic."""
    from pydoc_data.topics import topics

    out = []
    for name in sorted(topics):
        ids = tokenizer(topics[name], add_special_tokens=False)["input_ids"]
        if len(ids) >= length:
            out.append(ids[:length])
        if len(out) == rows:
            return torch.tensor(out)
    raise ValueError(f"pydoc_data.topics has fewer than {rows} topics of {length} tokens")


def accuracy_table(model, tokenizer, setup: AccuracySetup) -> dict[str, Quality]:
    """Teacher-forced quality of each of the setup's backends that this transformers has
    (fp8 only from 5.x) against the unquantized cache."""
    ids = corpus_ids(tokenizer, setup.rows, setup.prefill + setup.decode).to(model.device)
    reference = generation.teacher_forced_logits(model, ids, BACKENDS["none"], setup.settings, setup.prefill)
    available = caches.available_backends()
    return {name: teacher_forced_quality(model, ids, BACKENDS[name], setup.settings, setup.prefill, reference)
            for name in setup.backends if name in available}
