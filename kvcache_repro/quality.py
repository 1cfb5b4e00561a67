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
