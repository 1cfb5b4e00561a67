"""The suite's pytest plugin (conftest.py loads it, its pytest11 entry point wherever the suite
is installed): options.py (the options that narrow the matrix, configure-time checks, the gpu
and slow gates), kinds.py (the measured kinds, each once per session behind one fixture),
summary.py (the tables, the claims file, drift, --kv-update-baselines); state: state.py."""
from kvcache_repro.gpu import devices

# An xdist worker's GPU is chosen at import, before any hook can touch CUDA (the runtime reads
# CUDA_VISIBLE_DEVICES once); devices imports no torch.
DEVICE_NOTE = devices.apply_for_xdist_worker()

pytest_plugins = ["kvcache_repro.plugin.options", "kvcache_repro.plugin.kinds", "kvcache_repro.plugin.summary"]
