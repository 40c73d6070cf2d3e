"""Runs `fastgpt bench rmsnorm`: see fastgpt/bench/rms_norm.py (one implementation for both)."""
import sys

from fastgpt.bench.rms_norm import main

if __name__ == "__main__":
    sys.exit(main())
