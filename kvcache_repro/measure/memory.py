"""Memory probes and the one-run measurement (load a model, tokenize the scenario's
prompts, generate through one backend, read the probe), shared by CPU and CUDA:
- CUDA: peaks ``max_memory_reserved``/``max_memory_allocated`` (reset before generate),
  ``memory_reserved`` after it (the seed's own reading), the allocator's retries and OOMs
  (reserved.py), NVML device memory used when nvidia-ml-py is installed.
- CPU: ``peak_allocated`` as CUDA's: live tensor bytes at the peak, weights included,
  exact (peak.py). Peak RSS (VmHWM) is information only: glibc keeps freed blocks.
Both record the cache's exact bytes at the end (accounting.py) and the weights.
"""
from __future__ import annotations

import gc
import time
from dataclasses import asdict, dataclass, field

import torch

from kvcache_repro.measure import accounting, peak, reserved
from kvcache_repro.backends import generation, offline
from kvcache_repro.backends.matrix import BACKENDS
from kvcache_repro.backends.models import ModelUnavailable, kv_geometry, small_real_model, tiny_model
from kvcache_repro.measure.scenarios import Scenario


@dataclass(frozen=True)
class Measurement:
    """One (scenario, backend, batch) run. ``metrics``: bytes, by the names baselines use."""
    scenario: str
    backend: str
    batch: int
    device: str
    prompt_len: int
    new_tokens: int
    generate_seconds: float
    before_bytes: int  # in use before generate: weights + inputs (CPU: their storages; CUDA: memory_allocated)
    metrics: dict[str, int] = field(default_factory=dict)
    predicted_cache_bytes: int = 0
    notes: str = ""
    # CUDA: the caching allocator's configuration (reserved.allocator_config); a CPU run that
    # compares peak_reserved (a dry run) has simulated counters under reserved.EXPANDABLE.
    allocator: str = ""

    @property
    def transient_bytes(self) -> int | None:
        """Peak allocated beyond weights, inputs and the final cache: dequantized copies and
        requantization temporaries."""
        peak_bytes = self.metrics.get("peak_allocated")
        return None if peak_bytes is None else peak_bytes - self.before_bytes - self.metrics["cache_bytes"]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Measurement":
        return cls(**data)


SIMULATED_NOTE = ("peak_reserved SIMULATED on the CPU (a dry run): peak allocated in the CUDA allocator's "
                  "512-byte blocks, as expandable segments would reserve it with no holes")


# ---- probes ----------------------------------------------------------------------------

def _proc_status_bytes(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024  # kB
    raise RuntimeError(f"{field_name} not in /proc/self/status (Linux only)")


class CpuProbe:
    """``start(resident)`` with the tensors alive before the region (weights, inputs);
    ``stop()``: peak_allocated (resident + the region's peak) and the RSS figures."""

    def start(self, resident=()) -> int:
        gc.collect()
        self._resident = peak.storage_bytes(resident)
        self._tracker = peak.PeakTracker()
        self._tracker.ignore(resident)
        # "5" resets the peak resident set size (VmHWM) to the current RSS (proc(5)).
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        self._rss_before = _proc_status_bytes("VmRSS")
        self._tracker.__enter__()
        return self._resident

    def watch(self, model) -> None:
        """Also the peak of each forward call (``decode_step_peak`` in stop's metrics)."""
        self._steps = StepPeaks(model, self._tracker)

    def abandon(self) -> None:
        """Ends the region without a result (generate raised): a tracker left on would see
        every later op of the process."""
        self._tracker.__exit__(None, None, None)
        self._unwatch()

    def _unwatch(self) -> int | None:
        steps, self._steps = getattr(self, "_steps", None), None
        if steps is None:
            return None
        steps.remove()
        return steps.decode_step_peak()

    def stop(self) -> dict[str, int]:
        self._tracker.__exit__(None, None, None)
        rss_peak = _proc_status_bytes("VmHWM")
        out = {"peak_allocated": self._resident + self._tracker.peak,
               "peak_rss": rss_peak, "peak_rss_growth": rss_peak - self._rss_before}
        if (step := self._unwatch()) is not None:
            out["decode_step_peak"] = self._resident + step
        return out


class StepPeaks:
    """Per forward call of generate(): the tracker's peak inside it and whether the cache
    re-quantized in it (caches.quantized_stores). ``decode_step_peak``: the largest of the decode
    steps that did not - what a long decode lives with between flushes, which a flush's peak hides."""

    def __init__(self, model, tracker: peak.PeakTracker):
        from kvcache_repro.backends import caches

        self.steps: list[tuple[int, bool]] = []
        key, before = caches.cache_kwarg(model), []

        def pre(module, args, kwargs):
            before[:] = [caches.quantized_stores(kwargs.get(key))]
            tracker.open_window()

        def post(module, args, kwargs, output):
            self.steps.append((tracker.window, caches.quantized_stores(kwargs.get(key)) != before[0]))
        self._hooks = (model.register_forward_pre_hook(pre, with_kwargs=True),
                       model.register_forward_hook(post, with_kwargs=True))

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()

    def decode_step_peak(self) -> int | None:
        quiet = [window for window, requantized in self.steps[1:] if not requantized]  # [0]: the prefill
        return max(quiet) if quiet else None


class CudaProbe:
    def __init__(self, index: int = 0):
        self.index = index
        self.notes: list[str] = []  # what could not be read (NVML), said with the result

    def start(self, resident=()) -> int:
        gc.collect()
        torch.cuda.synchronize(self.index)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.index)
        self._stats_before = torch.cuda.memory_stats(self.index)
        self._nvml()  # a note, if NVML cannot be read
        return torch.cuda.memory_allocated(self.index)

    def abandon(self) -> None:
        """Nothing to undo: the CUDA counters are read, not installed."""

    def watch(self, model) -> None:
        """Nothing: a step's own peak would need the device's peak counter reset mid-run."""

    def stop(self) -> dict[str, int]:
        torch.cuda.synchronize(self.index)
        metrics = {"peak_reserved": torch.cuda.max_memory_reserved(self.index),
                   "peak_allocated": torch.cuda.max_memory_allocated(self.index),
                   "reserved_after": torch.cuda.memory_reserved(self.index)}
        # Cumulative counters (reset_peak_memory_stats keeps them): generate() added the difference.
        after = torch.cuda.memory_stats(self.index)
        try:
            free_total = torch.cuda.mem_get_info(self.index)
        except RuntimeError:  # a driver that does not report it: the counters still stand
            free_total = None
        metrics.update(reserved.allocator_counters(
            {k: after.get(k, 0) - self._stats_before.get(k, 0) for k in ("num_alloc_retries", "num_ooms")},
            free_total))
        if (nvml := self._nvml()) is not None:
            metrics["nvml_used_after"] = nvml
        return metrics

    def _nvml(self) -> int | None:
        value, note = _nvml_used(self.index)
        if note and note not in self.notes:
            self.notes.append(note)
        return value


def _nvml_used(index: int) -> tuple[int | None, str]:
    """Device memory in use as NVML sees it (every process), and a note when it cannot be
    read (never a failed row). Found by UUID, else PCI bus id, never by ``index``: torch's
    index counts only CUDA_VISIBLE_DEVICES, NVML's every GPU of the machine."""
    try:
        import pynvml
    except ImportError:
        return None, ""
    try:
        pynvml.nvmlInit()
        props = torch.cuda.get_device_properties(index)
        handle = None
        uuid = str(getattr(props, "uuid", "") or "")
        if uuid:
            for name in ((uuid,) if uuid.startswith(("GPU-", "MIG-")) else (f"GPU-{uuid}", f"MIG-{uuid}")):
                try:
                    handle = pynvml.nvmlDeviceGetHandleByUUID(name)
                    break
                except pynvml.NVMLError:
                    continue
        if handle is None and hasattr(props, "pci_bus_id"):
            bus = f"{getattr(props, 'pci_domain_id', 0):08x}:{props.pci_bus_id:02x}:{props.pci_device_id:02x}.0"
            handle = pynvml.nvmlDeviceGetHandleByPciBusId(bus)
        if handle is None:
            return None, f"NVML: device {index} not found by UUID {uuid or '?'} or PCI bus id; NVML figures left out"
        return int(pynvml.nvmlDeviceGetMemoryInfo(handle).used), ""
    except Exception as error:  # NVMLError, a driver/library mismatch, a MIG slice NVML cannot read
        return None, f"NVML could not be read ({type(error).__name__}: {error}); NVML figures left out"


def probe_for(device: str):
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("no CUDA device: run a cpu scenario, or use a machine with a GPU")
        return CudaProbe()
    return CpuProbe()


# ---- one run ---------------------------------------------------------------------------

def load_model(scenario: Scenario, checkpoint: str | None = None):
    """(model, tokenizer or None) for a scenario, on its device."""
    dtype = getattr(torch, scenario.dtype)
    if scenario.model == "tiny":
        return tiny_model("llama", dtype).to(scenario.device), None
    if scenario.model == "random":
        model = offline.random_model(scenario.arch, dtype, scenario.device)
        model.kvq_notes = [offline.random_weights_note(scenario.arch, scenario.dtype)]
        return model, None
    if scenario.model == "small-real":
        try:
            model, tokenizer = small_real_model(torch.float32)
        except ModelUnavailable as error:
            if not scenario.fallback_arch:
                raise
            model = offline.random_model(scenario.fallback_arch, dtype, scenario.device)
            model.kvq_notes = [offline.random_weights_note(scenario.fallback_arch, scenario.dtype,
                                                           f"FALLBACK, the real model is absent: {error}")]
            return model, None
        return model.to(device=scenario.device, dtype=dtype), tokenizer
    from kvcache_repro.backends.checkpoints import load_checkpoint

    return load_checkpoint(checkpoint or scenario.checkpoint, scenario, dtype)


def make_inputs(scenario: Scenario, tokenizer, batch: int):
    """Left-padded seed prompts (tiny model: seeded random ids). Padded to a multiple of
    8 tokens so group sizes up to 128 divide every quantized length."""
    if tokenizer is None:
        ids = torch.randint(3, 200, (batch, 8), generator=torch.Generator().manual_seed(0))
        return ids.to(scenario.device), torch.ones_like(ids).to(scenario.device)
    enc = tokenizer(scenario.prompts(batch), return_tensors="pt", padding=True, pad_to_multiple_of=8)
    return enc["input_ids"].to(scenario.device), enc["attention_mask"].to(scenario.device)


def measure(scenario: Scenario, backend: str, batch: int, model, tokenizer) -> Measurement:
    spec = BACKENDS[backend]
    ids, mask = make_inputs(scenario, tokenizer, batch)
    new_tokens = scenario.tokens(batch)
    generation.check_run(model, spec, scenario.settings, batch, ids.shape[1], new_tokens)
    probe = probe_for(scenario.device)
    weights = list(model.parameters()) + list(model.buffers())
    before = probe.start(weights + [ids, mask])
    probe.watch(model)
    t0 = time.perf_counter()
    try:
        run = generation.generate(model, ids, spec, scenario.settings, new_tokens, attention_mask=mask,
                                  keep_scores=False)
    except BaseException:  # OOM, an interrupt: the caller records it; the probe must not outlive the run
        probe.abandon()
        raise
    seconds = time.perf_counter() - t0
    metrics = probe.stop()
    held = accounting.cache_bytes(run.cache)
    metrics["cache_bytes"] = held.total
    notes = list(getattr(probe, "notes", []))
    if held.other:  # storage the model of a quantized cache has no place for: say what it is
        notes.append(f"cache holds {held.other} bytes outside quantized storage: {accounting.describe(run.cache)}")
    allocator = reserved.allocator_config() if scenario.device == "cuda" else ""
    if scenario.device == "cpu" and "peak_reserved" in scenario.baseline_metrics:  # a dry run's CUDA counters
        metrics.update(reserved.simulated_counters(metrics["peak_allocated"]))
        allocator = reserved.EXPANDABLE
        notes.append(SIMULATED_NOTE)
    metrics["weights_bytes"] = peak.storage_bytes(weights)
    g = kv_geometry(model)
    predicted = accounting.predict_cache_bytes(
        spec, scenario.settings,
        accounting.CacheGeometry(g.layers, batch, g.kv_heads, g.head_dim, getattr(torch, scenario.dtype)),
        prompt_len=ids.shape[1], total_tokens=ids.shape[1] + new_tokens - 1)
    return Measurement(scenario.name, backend, batch, scenario.device, ids.shape[1], new_tokens,
                       seconds, before, metrics, predicted.total, notes="; ".join(notes), allocator=allocator)
