"""``python -m gpt2lab.reference_loop``, renamed: one ``Error:`` line naming the new place."""

import sys

if __name__ == "__main__":
    args = " ".join(sys.argv[1:])
    print(f"Error: the reference loop moved: python -m gpt2lab.bench.reference_loop {args}".rstrip(), file=sys.stderr)
    raise SystemExit(1)
