"""Installed as ``gpt2lab.conf`` so that ``gpt2lab-train`` finds its configs outside a source checkout."""
