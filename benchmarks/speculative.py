"""Same as ``dream-bench`` (see dream_export/bench.py): python benchmarks/speculative.py --bundle B [--model M] ..."""

import sys

from dream_export.bench import main

if __name__ == "__main__":
    sys.exit(main())
