"""Your model, the whole question (``./kvq experiment --model``): after the memory rows, each
backend's teacher-forced accuracy against the unquantized cache on a text, and its decode time
relative to the unquantized cache, measured in this process on the same model; the seed's claims
decided on this model; one report. Their entries join the model's own baseline file beside the
memory entries (a first run records them and says so, later runs compare).

Accuracy: the ``core`` table's protocol (2 rows x (64 prefilled + 128 decoded) tokens, 16 per
forward) on the stdlib's help topics, or ``--text FILE``. Speed: speed.py's interleaved method,
CPU time of one thread on a CPU, CUDA events on a GPU; one row, a 16-token prompt, 80 new
tokens (one flush at the seed's R 64), 4 rounds in 2 blocks.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from kvcache_repro.backends import generation
from kvcache_repro.backends.matrix import BACKENDS
from kvcache_repro.measure import memory, quality, speed
from kvcache_repro.runner.accuracy_runs import AccuracyTable
from kvcache_repro.verdicts import claims

ROWS, PREFILL, DECODE, STEP = 2, 64, 128, 16
SPEED_PROMPT, SPEED_NEW, SPEED_ROUNDS = 16, 80, 4


@dataclass
class Answer:
    """Accuracy and speed of a model's backends; ``failures``: "accuracy quanto2" -> why."""

    accuracy: AccuracyTable | None
    speed: dict[str, speed.SpeedRatio]
    speed_setup: speed.SpeedSetup
    text: str
    failures: dict[str, str] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def ratios(self, ratio_type) -> list:
        """As the memory run's ``Ratio``s (``ratio_type``), for the baseline file: KL, top-1 (the
        agreeing positions of all), perplexity ratio per backend; decode time ratio."""
        out = []
        if self.accuracy is not None:
            positions = ROWS * DECODE
            for name, q in self.accuracy.finite_results.items():
                out += [ratio_type(name, ROWS, "kl", q.kl, 0, 0),
                        ratio_type(name, ROWS, "top1_agreement", q.top1_agreement,
                                   round(q.top1_agreement * positions), positions),
                        ratio_type(name, ROWS, "perplexity_ratio", q.perplexity / q.reference_perplexity, 0, 0)]
        out += [ratio_type(name, 1, "decode_time_ratio", r.ratio, 0, 0) for name, r in self.speed.items()
                if math.isfinite(r.ratio)]
        return out

    def to_json(self) -> dict:
        acc = self.accuracy
        return {"text": self.text, "failures": self.failures, "seconds": self.seconds,
                "accuracy": None if acc is None else {
                    "protocol": acc.describe(), "reference_perplexity": acc.reference_perplexity,
                    "results": {n: asdict(q) for n, q in acc.results.items()}},
                "speed": {"setup": self.speed_setup.describe(), "ratios": speed.ratios_to_json(self.speed)}}


def text_ids(tokenizer, vocab: int, text_file: str | None) -> tuple[torch.Tensor, str]:
    """(ROWS x (PREFILL + DECODE) token ids, what they are): ``text_file`` cut into consecutive
    rows; else the stdlib's help topics (quality.corpus_ids); seeded random ids without a tokenizer."""
    n = PREFILL + DECODE
    if text_file:
        ids = tokenizer(Path(text_file).read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
        if len(ids) < ROWS * n:
            raise ValueError(f"--text {text_file}: {len(ids)} tokens, the protocol needs {ROWS * n} "
                             f"({ROWS} rows x {n}); give a longer text")
        return torch.tensor(ids[:ROWS * n]).view(ROWS, n), f"{text_file} (first {ROWS * n} tokens)"
    if tokenizer is None:
        return (torch.randint(3, vocab, (ROWS, n), generator=torch.Generator().manual_seed(0)),
                "seeded random ids (the model has no tokenizer)")
    return quality.corpus_ids(tokenizer, ROWS, n), "the stdlib's help topics (pydoc_data.topics)"


def _accuracy(model, tokenizer, scenario, backends, text_file, say) -> tuple[AccuracyTable | None, str, dict]:
    failures: dict[str, str] = {}
    ids, text = text_ids(tokenizer, model.config.get_text_config(decoder=True).vocab_size, text_file)
    ids = ids.to(model.device)
    setup = quality.AccuracySetup("model", tuple(backends), ROWS, PREFILL, DECODE, STEP, model="checkpoint",
                                  settings=scenario.settings, dtype=scenario.dtype,
                                  proxy=f"teacher-forced on {text}")
    step = quality.effective_step(model, setup)
    reference = generation.teacher_forced_logits(model, ids, BACKENDS["none"], setup.settings, PREFILL, step)
    results, t0 = {}, time.monotonic()
    for i, name in enumerate(backends):
        say(f"accuracy: {name} ({i + 1} of {len(backends)})", t0, i, len(backends))
        try:
            results[name] = quality.teacher_forced_quality(model, ids, BACKENDS[name], setup.settings, PREFILL,
                                                           reference, step)
        except Exception as error:  # a backend this release or model refuses: a row that says so
            failures[f"accuracy {name}"] = f"{type(error).__name__}: {error}"
    table = AccuracyTable(scenario.device, setup, results, step) if results else None
    if table is not None:  # left out of the compared entries: a failure of its own, said
        failures.update({f"accuracy {name}": f"non-finite logits: first at {where}" for name, where in table.nonfinite.items()})
    return table, text, failures


def _setup(scenario, device: str, backends=()) -> speed.SpeedSetup:
    return speed.SpeedSetup("model", "your", 1, SPEED_PROMPT, SPEED_NEW, scenario.settings, SPEED_ROUNDS, backends,
                            device=device)


def _speed(model, scenario, backends, say) -> tuple[dict, speed.SpeedSetup, dict]:
    failures: dict[str, str] = {}
    vocab = model.config.get_text_config(decoder=True).vocab_size
    ids = torch.randint(3, min(vocab, 10000), (1, SPEED_PROMPT), generator=torch.Generator().manual_seed(0))
    ids = ids.to(model.device)
    usable = []
    for name in backends:  # a backend that cannot run would end the interleaved rounds of all: tried at full length
        try:
            generation.generate(model, ids, BACKENDS[name], scenario.settings, SPEED_NEW, keep_scores=False)
            usable.append(name)
        except Exception as error:
            failures[f"speed {name}"] = f"{type(error).__name__}: {error}"
    setup = _setup(scenario, model.device.type, tuple(usable))
    if not usable:
        return {}, setup, failures
    t0 = time.monotonic()  # one unquantized run, for the estimate: the quantized ones take a little longer
    generation.generate(model, ids, BACKENDS["none"], scenario.settings, SPEED_NEW, keep_scores=False)
    guess = (time.monotonic() - t0) * (len(usable) + 1) * SPEED_ROUNDS * 1.2
    say(f"speed: {len(usable) + 1} backends interleaved, {SPEED_ROUNDS} rounds, ~{guess:.0f} s left",
        time.monotonic(), 0, 1)
    ratios = speed.interleaved_ratios(model, ids, usable, scenario.settings, SPEED_NEW, SPEED_ROUNDS, 2)
    return ratios, setup, failures


def answer(scenario, checkpoint: str | None, text_file: str | None = None, log=print) -> Answer:
    """Accuracy, then speed, of ``scenario.backends`` on its model (loaded once, here)."""
    def say(what: str, t0: float, done: int, total: int) -> None:
        left = "" if not done else f", ~{(time.monotonic() - t0) / done * (total - done):.0f} s left"
        log(f"  {what}{left}")

    model, tokenizer = memory.load_model(scenario, checkpoint)
    quantized = [b for b in scenario.backends if b != "none"]
    seconds, t0 = {}, time.monotonic()
    table, text, failures = _accuracy(model, tokenizer, scenario, quantized, text_file, say)
    seconds["accuracy"] = round(time.monotonic() - t0, 1)
    t0 = time.monotonic()
    try:
        ratios, setup, speed_failures = _speed(model, scenario, quantized, say)
    except Exception as error:  # the unquantized run or the rounds: the accuracy measured stays
        ratios, setup = {}, _setup(scenario, model.device.type)
        speed_failures = {"speed": f"{type(error).__name__}: {error}"}
    seconds["speed"] = round(time.monotonic() - t0, 1)
    return Answer(table, ratios, setup, text, {**failures, **speed_failures}, seconds)


def complete(run, scenario, text_file: str | None = None, log=print) -> Answer:
    """After ``run``'s memory rows (experiment.ExperimentRun): accuracy and speed of the same
    backends on the same model, their entries compared, or recorded on a first run, and added to
    ``run``'s ratios and verdicts; the Answer kept as ``run.answer``."""
    from kvcache_repro.runner import experiment

    log(f"{scenario.name}: accuracy and speed of {len(scenario.backends) - 1} quantized backends, in this process")
    try:
        ans = answer(scenario, None, text_file, log)
    except Exception as error:  # the memory rows' report is still written; the run fails, saying why
        ans = Answer(None, {}, _setup(scenario, scenario.device), "-",
                     {"accuracy and speed": f"{type(error).__name__}: {error}"})
    extra = ans.ratios(experiment.Ratio)
    failed = [*run.failures, *ans.failures, *(v for v in run.verdicts if not v.passed)]  # none recorded from them
    run.ratios += extra
    run.verdicts += experiment.record_first_run(scenario, run.measurements, extra,
                                                experiment.compare_with_baselines(scenario.name, extra), failed)
    run.answer = ans
    return ans


def decided_claims(scenario, measurements, ans: Answer) -> tuple[list[claims.ClaimResult], list[str]]:
    """The seed's claims on this model where its runs have what each needs; why not, for the rest."""
    out, skipped = [], []
    have = {(m.backend, m.batch) for m in measurements}
    large = max(scenario.batch_sizes)
    short = min(m.new_tokens for m in measurements) < 3 * scenario.settings.residual_length if measurements else False
    memory_claims = [("saves_little_for_one_short_prompt", claims.saves_little_for_one_short_prompt, 1),
                     ("saves_a_lot_at_200_prompts", claims.saves_a_lot_at_large_batch, large),
                     ("quanto_uses_less_memory_than_hqq", claims.quanto_less_than_hqq, large)]
    for claim_id, decide, batch in memory_claims:
        if short and claim_id != "saves_little_for_one_short_prompt":
            skipped.append(f"{claim_id}: {scenario.new_tokens} new tokens at residual "
                           f"{scenario.settings.residual_length} keep most of the cache in full precision; "
                           f"give --new-tokens >= {3 * scenario.settings.residual_length}")
        elif all((b, batch) in have for b in ("none", "quanto4", "hqq4")):
            out.append(decide(scenario.name, scenario, measurements))
        else:
            skipped.append(f"{claim_id}: needs none, quanto4 and hqq4 measured at batch {batch}")
    finite = ans.accuracy.finite_results if ans.accuracy else {}
    for nbits, axis in ((2, 0), (4, 0), (4, 1)):
        hqq = f"hqq{nbits}" + ("-axis1" if axis else "")
        if hqq in finite and f"quanto{nbits}" in finite:
            out.append(claims.hqq_more_accurate_than_quanto(ans.accuracy, nbits, axis))
    if "quanto4" in ans.speed and "hqq4" in ans.speed:  # the seed's two backends, as the built-in setups decide it
        seed = {name: ans.speed[name] for name in ("quanto4", "hqq4")}
        out += [claims.hqq_slower_than_quanto(ans.speed_setup, seed),
                claims.quantization_slows_decoding(ans.speed_setup, seed)]
    else:
        skipped.append("the speed claims: need quanto4 and hqq4 timed")
    return out, skipped


def table(scenario, measurements, ans: Answer) -> str:
    """One line per backend: peak ratio at each batch, cache bytes per token, KL, top-1,
    perplexity ratio, decode time ratio; then what failed."""
    batches = sorted({m.batch for m in measurements})
    peaks = {(m.backend, m.batch): m.metrics.get("peak_allocated") for m in measurements}
    head = ([f"{'backend':>11}"] + [f"{'peak/none b' + str(b):>15}" for b in batches]
            + [f"{'cache B/token':>13}", f"{'KL':>9}", f"{'top-1':>6}", f"{'ppl ratio':>9}", f"{'time/none':>9}"])
    lines = [" ".join(head)]
    largest = max(batches) if batches else None
    acc = ans.accuracy.results if ans.accuracy else {}
    for name in scenario.backends:
        row = [f"{name:>11}"]
        for b in batches:
            p, n = peaks.get((name, b)), peaks.get(("none", b))
            row.append(f"{(p / n if p and n else math.nan):>15.3f}")
        m = next((m for m in measurements if m.backend == name and m.batch == largest), None)
        tokens = None if m is None else m.batch * (m.prompt_len + m.new_tokens - 1)
        row.append(f"{(m.metrics['cache_bytes'] / tokens if m else math.nan):>13.1f}")
        q = acc.get(name)
        row += ([f"{q.kl:>9.4f}", f"{q.top1_agreement:>6.3f}", f"{q.perplexity / q.reference_perplexity:>9.4f}"]
                if q else [f"{'-' if name != 'none' else 0:>9}", f"{'-' if name != 'none' else 1:>6}",
                           f"{'-' if name != 'none' else 1:>9}"])
        r = ans.speed.get(name)
        row.append(f"{r.ratio:>9.3f}" if r else f"{'1' if name == 'none' else '-':>9}")
        lines.append(" ".join(row))
    lines += [f"  {what}: FAILED: {why}" for what, why in ans.failures.items()]
    return "\n".join(lines)


def plot(path: Path, scenario, measurements, ans: Answer) -> None:
    """Left: memory saved at the largest batch (1 - peak / none's) against accuracy lost (KL),
    one point per backend; right: decode time / none's, with the spread of its blocks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    largest = max(m.batch for m in measurements)
    peaks = {m.backend: m.metrics.get("peak_allocated") for m in measurements if m.batch == largest}
    acc = ans.accuracy.finite_results if ans.accuracy else {}
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    for name, q in acc.items():
        if peaks.get(name) and peaks.get("none"):
            saved = 1 - peaks[name] / peaks["none"]
            left.scatter(saved, q.kl)
            left.annotate(name, (saved, q.kl), fontsize=8, xytext=(3, 3), textcoords="offset points")
    left.set_xlabel(f"memory saved at batch {largest} (1 - peak allocated / none's)")
    left.set_ylabel("accuracy lost: KL(none || backend), nats/token")
    left.set_yscale("log")
    names = list(ans.speed)
    right.bar(names, [ans.speed[n].ratio for n in names],
              yerr=[[max(ans.speed[n].ratio - ans.speed[n].low, 0) for n in names],  # all rounds' minima can
                    [max(ans.speed[n].high - ans.speed[n].ratio, 0) for n in names]])  # lie below each block's
    right.axhline(1.0, color="grey", lw=0.8)
    right.set_ylabel("decode time / none's")
    right.tick_params(axis="x", labelrotation=45, labelsize=8)
    fig.suptitle(f"{scenario.name}: memory saved vs accuracy lost, and speed", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def report(directory: Path, scenario, measurements, ans: Answer, log=print) -> list[Path]:
    """Prints the table per backend and the claims; writes model.md, model.json, model.png."""
    from kvcache_repro.core.atomic import write_atomic

    decided, skipped = decided_claims(scenario, measurements, ans)
    text = table(scenario, measurements, ans)
    said = claims.table(decided) + "".join(f"\nnot decided: {why}" for why in skipped)
    log(f"\n{scenario.name}: per backend (accuracy on {ans.text}; speed: {ans.speed_setup.describe()})\n{text}"
        f"\n\nthe seed's claims on this model:\n{said}")
    paths = [directory / "model.md", directory / "model.json", directory / "model.png"]
    plotted = bool(measurements and (ans.speed or ans.accuracy))
    write_atomic(paths[0], f"# {scenario.name}: memory, accuracy and speed per backend\n\n{scenario.notes}\n\n"
                           f"Accuracy: {ans.accuracy.describe() if ans.accuracy else 'not measured'}; "
                           f"speed: {ans.speed_setup.describe()}.\n\n```\n{text}\n```\n\n"
                           + (f"![memory saved vs accuracy lost, and speed]({paths[2].name})\n\n" if plotted else "")
                           + claims.markdown(decided, "Decided on this model's runs.")
                           + "".join(f"\nNot decided: {why}\n" for why in skipped))
    write_atomic(paths[1], json.dumps({"scenario": scenario.name, **ans.to_json(),
                                       "claims": [{**asdict(c), "claim": c.text} for c in decided]},
                                      indent=2, default=str) + "\n")
    if plotted:
        tmp = paths[2].with_name(f".{paths[2].name}.tmp.png")
        plot(tmp, scenario, measurements, ans)
        os.replace(tmp, paths[2])
    else:  # an earlier run's plot is not this run's
        paths.pop().unlink(missing_ok=True)
    return paths
