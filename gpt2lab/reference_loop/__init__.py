"""The old name of ``python -m gpt2lab.bench.reference_loop``: running it says where the loop moved."""
