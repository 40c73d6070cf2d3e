"""Runs `fastgpt bench context`: see fastgpt/bench/context_scaling.py (one implementation for both)."""
import sys

from fastgpt.bench.context_scaling import main

if __name__ == "__main__":
    sys.exit(main())
