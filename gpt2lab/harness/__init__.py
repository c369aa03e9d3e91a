"""lm-evaluation-harness with gpt2lab's models: ``gpt2lab evaluate tasks=[...]``, ``callbacks.harness`` during
training, and ``lm_eval --model gpt2lab`` through ``gpt2lab lm-eval`` (lm-eval's own command line with the model
registered). lm-eval is an optional extra, imported only where a task is run: ``pip install 'gpt2lab[eval]'``."""
