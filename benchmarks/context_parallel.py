"""Runs `fastgpt bench context-parallel`: see fastgpt/bench/context_parallel.py (one implementation for both)."""
import sys

from fastgpt.bench.context_parallel import main

if __name__ == "__main__":
    sys.exit(main())
