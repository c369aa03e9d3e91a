"""``python -m gpt2lab.bench``: speed measurements."""

from gpt2lab.bench.training import main

if __name__ == "__main__":
    raise SystemExit(main())
