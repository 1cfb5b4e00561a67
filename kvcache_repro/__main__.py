"""``python -m kvcache_repro VERB [args]``: the suite's command line (kvcache_repro/commands/);
``python -m kvcache_repro help`` lists the verbs."""
import sys

from kvcache_repro.commands import main

if __name__ == "__main__":
    sys.exit(main())
