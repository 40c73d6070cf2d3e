"""Runs `fastgpt bench attention`: see fastgpt/bench/attention.py (one implementation for both)."""
import sys

from fastgpt.bench.attention import main

if __name__ == "__main__":
    sys.exit(main())
