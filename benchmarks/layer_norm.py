"""Runs `fastgpt bench layernorm`: see fastgpt/bench/layer_norm.py (one implementation for both)."""
import sys

from fastgpt.bench.layer_norm import main

if __name__ == "__main__":
    sys.exit(main())
