"""The seed's claims, each with the verdict this setup is expected to give.

A claim expected NOT to hold is run as ``xfail(strict=True)`` with the measured numbers
in its reason, so the verdict shows in every run and a change flips it loudly. The
expected verdicts were measured on a 2-core CPU (torch 2.13.0, transformers 5.24.0,
optimum-quanto 0.2.7, hqq 0.2.8.post1); see the README's claims table.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Claim:
    id: str
    text: str  # as the seed puts it
    expected_to_hold: bool


CLAIMS = {c.id: c for c in (
    Claim("saves_little_for_one_short_prompt",
          "quantizing the KV cache saves little memory for one prompt with few output tokens", True),
    Claim("saves_a_lot_at_200_prompts",
          "with 200 prompts generating at once, quantizing the KV cache saves a lot of memory", True),
    Claim("hqq_more_accurate_than_quanto", "HQQ is more accurate than quanto (at equal nbits)", True),
    Claim("hqq_slower_than_quanto", "HQQ is slower than quanto", True),
    Claim("quantization_slows_decoding", "quantizing the KV cache reduces inference speed", True),
    # The seed's table, not its text: quanto 18.94 GB < HQQ 29.34 GB reserved at batch 200.
    # Here both hold exactly the same cache bytes at 4 bits (same packing, same groups).
    Claim("quanto_uses_less_memory_than_hqq",
          "at batch 200 quanto needs less memory than HQQ (seed: 18.94 vs 29.34 GB)", False),
)}


@dataclass
class ClaimResult:
    claim: Claim
    setup: str
    numbers: str
    holds: bool

    @property
    def verdict(self) -> str:
        if self.holds == self.claim.expected_to_hold:
            return "holds" if self.holds else "does not hold (as expected)"
        return "CHANGED: now holds" if self.holds else "CHANGED: no longer holds"


def table(results: list[ClaimResult]) -> str:
    lines = [f"{'claim':<36} {'verdict':<28} {'setup':<40} numbers"]
    for r in results:
        lines.append(f"{r.claim.id:<36} {r.verdict:<28} {r.setup:<40} {r.numbers}")
    return "\n".join(lines)
