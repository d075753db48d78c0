#!/usr/bin/env python
"""Run the full HetConv speed benchmark and write docs/full_results.{md,json,png}.

Same as ``hetconv bench`` (all options are passed through), e.g.::

    python benchmarks/run_all.py --quick
    python benchmarks/run_all.py --what models --max-minutes 20
"""

import sys

from hetconv.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench"] + sys.argv[1:]))
