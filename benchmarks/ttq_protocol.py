"""Time to DDP's quality on a simulated slow network: the protocol's stages (``benchmarks/ttq/``).

::

    python benchmarks/ttq_protocol.py tune              # ~8 min per entry (2 cores, loopback)
    python benchmarks/ttq_protocol.py run               # needs root (netsim)
    python benchmarks/ttq_protocol.py report
    python benchmarks/ttq_protocol.py recheck --cell gpt-2h-100mbit --runs ddp_adamw:1024
    python benchmarks/ttq_protocol.py bound --cell gpt-2h-20mbit --runs ENTRY:STEPS  # no rate limit
    python benchmarks/ttq_protocol.py --quick tune --entries ddp_adamw ranger_k8  # smoke test
"""

import sys

from ttq.cli import main

if __name__ == "__main__":
    sys.exit(main())
