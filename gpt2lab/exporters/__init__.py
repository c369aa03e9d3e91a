"""Models out of gpt2lab: Hugging Face, ONNX (with a KV cache) and TorchScript directories, each with the
tokenizer, the config, safetensors weights and a model card (``python -m gpt2lab.export``).

Nothing is imported here: ``gpt2lab.exporters.onnx_generation`` must load where PyTorch is not installed.
"""
