"""Inference: the text generator and completions, the chat session, and the ONNX Runtime generator. Nothing here
imports PyTorch at import time: an ONNX export is served without it."""
