"""Runs `fastgpt bench model`: see fastgpt/bench/model.py (one implementation for both)."""
import sys

from fastgpt.bench.model import main

if __name__ == "__main__":
    sys.exit(main())
