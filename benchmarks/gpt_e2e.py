"""Runs `fastgpt bench gpt`: see fastgpt/bench/gpt_e2e.py (one implementation for both)."""
import sys

from fastgpt.bench.gpt_e2e import main

if __name__ == "__main__":
    sys.exit(main())
