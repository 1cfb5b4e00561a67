"""The suite's pytest plugin: options that narrow the matrix, the gpu and slow gates, the
session-wide measured kinds (memory experiment, accuracy table, decode speed) and the
end-of-run summary with the baseline update. The repository's conftest.py loads it (and
its pytest11 entry point does wherever the suite is installed); conftest keeps the card's
fixtures over models x backends x batch sizes.

- options.py: command-line options, the validated selection, configure-time checks, gates
- kinds.py: the measured kinds, each measured once per session behind one fixture
- summary.py: the tables, the claims file, drift, --kv-update-baselines
State lives in ``config.stash`` under the keys of state.py."""
from kvcache_repro.gpu import devices

# An xdist worker's GPU is chosen here, at import, before any hook can touch CUDA: the
# runtime reads CUDA_VISIBLE_DEVICES once, when it initialises, and CUDA subprocesses
# inherit the narrowed value. devices imports no torch (it counts GPUs in a subprocess).
DEVICE_NOTE = devices.apply_for_xdist_worker()

pytest_plugins = ["kvcache_repro.plugin.options", "kvcache_repro.plugin.kinds", "kvcache_repro.plugin.summary"]
