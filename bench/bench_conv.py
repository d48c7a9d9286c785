"""conv2d benchmark, nfed vs PyTorch CPU in the same run (the same code as `nfed bench conv`).

    python bench/bench_conv.py [--repeat N] [--json] [--no-memory]
"""
from __future__ import annotations

import sys

from nfed.commands.bench_conv import conv

if __name__ == "__main__":
    sys.exit(conv.main(prog_name="bench_conv.py"))
