"""Which scenario ``./kvq experiment`` runs: ``seed`` on CUDA when its checkpoint loads (and
bitsandbytes is there for its NF4 weights), else ``gpu-small``; ``cpu`` without a GPU.
``--model ID_OR_DIR`` runs the same protocol on your model, with baselines of its own.
"""
from __future__ import annotations

import dataclasses

import torch

from kvcache_repro.backends import caches, checkpoints, matrix
from kvcache_repro.backends.model_cache import ModelUnavailable
from kvcache_repro.backends.offline import ARCHS
from kvcache_repro.core import cli
from kvcache_repro.core.provenance import device_name
from kvcache_repro.measure import scenarios

# What makes a checkpoint the seed's model: Llama-3-8B's shapes. Another model passed as the
# seed's would be compared with the seed's ratios and, with --update-baselines, overwrite them.
SEED_SHAPE_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                   "intermediate_size", "vocab_size")


class ModelSetupError(ValueError):
    """--model cannot run as given (cannot load, bad settings): the message says why and the fix."""


def choose_scenario(checkpoint: str | None = None, log=print) -> scenarios.Scenario:
    """The scenario this machine can run (the module's docstring), saying why not the seed."""
    if not torch.cuda.is_available():
        return scenarios.get("cpu")
    try:
        checkpoints.probe(checkpoint or scenarios.SEED_CHECKPOINT)
        why = "" if checkpoints.nf4_available() else (
            f"its NF4 weights need bitsandbytes ({checkpoints.NF4_FIX})")
    except ModelUnavailable as error:
        why = str(error)
    if why:
        log(f"seed scenario not run: {why}; running gpu-small instead")
    return scenarios.get("gpu-small" if why else "seed")


def not_the_seed_model(config: dict) -> list[str]:
    """How ``config`` differs from the seed model's architecture ([] when it is it)."""
    seed = ARCHS["llama3-8b"]
    return [f"{k} {config.get(k)} (the seed's: {seed[k]})" for k in SEED_SHAPE_KEYS
            if config.get(k) != seed[k]]


def seed_checkpoint_problem(checkpoint: str) -> str:
    """Why ``checkpoint`` cannot stand in for the seed's model ("" when it can)."""
    try:
        differs = not_the_seed_model(checkpoints.probe(checkpoint))
    except ModelUnavailable as error:
        return str(error)
    if not differs:
        return ""
    return (f"--checkpoint {checkpoint} is not the seed's model ({'; '.join(differs)}), so the seed's ratios "
            f"(baselines/seed.json) do not apply to it. Run it as your own model, with baselines of its own: "
            f"./kvq experiment --model {checkpoint}")


# --model's default: the seed's two at 2 and 4 bits, hqq along both axes, fp8 where the release has it
MODEL_BACKENDS = ("none", "quanto2", "quanto4", "hqq2", "hqq4", "hqq2-axis1", "hqq4-axis1", "fp8")


def model_backends(raw: str | None) -> list[str]:
    """--backends of a model run (default MODEL_BACKENDS), those the installed releases build."""
    available = caches.available_backends()
    if raw is None:
        return [name for name in MODEL_BACKENDS if name in available]
    return [b.name for b in matrix.select_backends(raw, available)]


def model_scenario(args, cuda_available: bool | None = None, log=print) -> scenarios.Scenario:
    """The scenario of ``--model`` and its options, registered for the workers; the model's
    config is read first (a child process), so a model that cannot load stops here."""
    if cuda_available is None:
        cuda_available = torch.cuda.is_available()
    device = args.device or ("cuda" if cuda_available else "cpu")
    if device == "cuda" and not cuda_available:
        raise ModelSetupError("--device cuda: no CUDA device here (torch.cuda.is_available() is False); "
                              "run with --device cpu, or on a machine with a GPU")
    cuda = device == "cuda"
    try:
        backends = model_backends(args.backends)
        batches = matrix.select_batch_sizes(args.batch_sizes, (1, 200) if cuda else (1, 8))
    except matrix.SelectionError as error:
        raise ModelSetupError(str(error)) from None
    if "none" not in backends:
        raise ModelSetupError("--backends must include none: every ratio is to the unquantized run")
    if args.weights == "nf4" and cuda and not checkpoints.nf4_available():
        raise ModelSetupError(f"--weights nf4 needs bitsandbytes: {checkpoints.NF4_FIX}")
    try:
        config = checkpoints.probe(args.model)
        new_tokens = args.new_tokens or (1000 if cuda else 64)
        scenario = scenarios.model_scenario(
            args.model, checkpoints.identity(args.model, config), device, device_name(device), backends, batches,
            new_tokens, scenarios.DTYPES[args.dtype or ("fp16" if cuda else "fp32")], args.weights,
            args.q_group_size, args.residual_length, getattr(args, "text", None))
    except (ModelUnavailable, scenarios.SelectionError) as error:
        raise ModelSetupError(str(error)) from None
    heads = config.get("num_attention_heads") or 1
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or (config.get("hidden_size") or 0) // heads
    refused = {}
    for name in backends:
        try:  # prompts are padded to a multiple of 8 tokens: 8 for the seed's prompts
            caches.check_quantizable(matrix.BACKENDS[name], scenario.settings, batch=max(batches), kv_heads=kv_heads,
                                     head_dim=head_dim, prompt_len=8, new_tokens=new_tokens)
        except ValueError as error:
            if args.backends is not None:  # asked for by name: the run cannot do what was asked
                raise ModelSetupError(f"{name} cannot quantize this model's cache: {error}") from None
            refused[name] = str(error)
    if refused:  # the default list: the rest runs, and the report says which were left out and why
        for name, why in refused.items():
            log(f"{name} left out: it cannot quantize this model's cache ({why})")
        scenario = dataclasses.replace(scenario, backends=tuple(b for b in scenario.backends if b not in refused))
    return scenarios.register(scenario)


def check_applicable(args, scenario: scenarios.Scenario) -> None:
    """Options the chosen scenario would silently ignore are an error (cli.UsageError)."""
    if args.checkpoint and scenario.model != "checkpoint":
        loads = ", ".join(n for n, s in scenarios.SCENARIOS.items() if s.model == "checkpoint")
        raise cli.UsageError(f"--checkpoint applies to scenarios that load a checkpoint ({loads}); "
                             f"{scenario.name} uses its own model ({scenario.model}). "
                             f"Drop --checkpoint or pass --scenario seed")
    if args.in_process and scenario.device != "cpu":
        raise cli.UsageError(f"--in-process is for CPU scenarios; {scenario.name} runs on {scenario.device}, "
                             f"where peaks need a fresh process per row")
    if (args.lanes or 1) > 1 and scenario.device != "cpu":
        raise cli.UsageError(f"--lanes {args.lanes}: {scenario.name} runs on {scenario.device}, where rows "
                             f"side by side would share the card (their peaks, free memory and times mixed); "
                             f"drop --lanes")
    if args.in_process and args.worker_timeout is not None:
        raise cli.UsageError("--worker-timeout applies to worker processes, not to --in-process")
