"""Runs `fastgpt bench decode`: see fastgpt/bench/decode.py (one implementation for both)."""
import sys

from fastgpt.bench.decode import main

if __name__ == "__main__":
    sys.exit(main())
