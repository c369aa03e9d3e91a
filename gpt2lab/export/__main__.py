"""``python -m gpt2lab.export`` / ``gpt2lab export``: a checkpoint as Hugging Face, ONNX and TorchScript."""

from gpt2lab.exporters.export import main

if __name__ == "__main__":
    main()
