"""The fixed text of a model card (``model_card.py`` fills it in): what each export format is and holds, the
usage snippets, the limitations and the citation."""

FORMAT_NAMES = {
    "hf": "a Hugging Face `transformers` model (`GPT2LMHeadModel`)",
    "onnx": "an ONNX decoder graph with a KV cache, for onnxruntime",
    "torchscript": "a TorchScript program",
}
FILES = {
    "hf": "Files: `config.json` and `model.safetensors` (transformers' GPT-2), `generation_config.json`, the "
    "tokenizer (`tokenizer.json`, `tokenizer_config.json`).",
    "onnx": "Files: `model.onnx` (inputs `input_ids`, `attention_mask`, `position_ids`, `past_key_values.<layer>.key` "
    "/ `.value`; outputs `logits`, `present.<layer>.key` / `.value`), `model.safetensors` and `config.json` "
    "(gpt2lab's weights and architecture), the tokenizer (`tokenizer.json`, `tokenizer_config.json`).",
    "torchscript": "Files: `model.pt` (`input_ids` (batch, sequence) in, logits (batch, sequence, vocabulary) out), "
    "`model.safetensors` and `config.json` (gpt2lab's weights and architecture), the tokenizer (`tokenizer.json`, "
    "`tokenizer_config.json`).",
}
HF_USAGE = """With `transformers`:

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained("{directory}")
model = AutoModelForCausalLM.from_pretrained("{directory}")
inputs = tokenizer("def", return_tensors="pt")
output = model.generate(**inputs, max_new_tokens=20, do_sample=False)
print(tokenizer.decode(output[0]))
```"""
# A chat model's snippet: the conversation through its chat template, the reply alone printed.
CHAT_MESSAGE = "Hello! Who are you?"
HF_CHAT_USAGE = """With `transformers` (the tokenizer holds the chat template; `generate` stops at the end of the turn):

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained("{directory}")
model = AutoModelForCausalLM.from_pretrained("{directory}")
messages = [{{"role": "user", "content": "{message}"}}]
inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True, return_tensors="pt")
output = model.generate(**inputs, max_new_tokens=20, do_sample=False)
print(tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True))
```"""
ONNX_USAGE = """With onnxruntime alone (numpy, onnxruntime and tokenizers; greedy decoding with the KV cache):

```python
import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

directory = "{directory}"
tokenizer = Tokenizer.from_file(f"{{directory}}/tokenizer.json")
session = ort.InferenceSession(f"{{directory}}/model.onnx", providers=["CPUExecutionProvider"])
ids = np.array([tokenizer.encode({prompt}).ids], dtype=np.int64)
past = {{f"past_key_values.{{i}}.{{kv}}": np.zeros((1, {heads}, 0, {head_dim}), np.float32)
        for i in range({layers}) for kv in ("key", "value")}}
new = ids
for _ in range(20):
    positions = np.arange(ids.shape[1] - new.shape[1], ids.shape[1])[None]
    logits, *presents = session.run(
        None, {{"input_ids": new, "attention_mask": np.ones_like(ids), "position_ids": positions, **past}}
    )
    past = dict(zip(past, presents))  # this step's keys and values are the next step's past
    new = logits[:, -1].argmax(-1)[:, None]
    ids = np.concatenate([ids, new], 1)
print(tokenizer.decode(ids[0].tolist()))
```"""
TORCHSCRIPT_USAGE = """With PyTorch alone (no gpt2lab):

```python
import torch
from tokenizers import Tokenizer

tokenizer = Tokenizer.from_file("{directory}/tokenizer.json")
model = torch.jit.load("{directory}/model.pt")
ids = torch.tensor([tokenizer.encode({prompt}).ids])
with torch.no_grad():
    for _ in range(20):
        ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], 1)
print(tokenizer.decode(ids[0].tolist()))
```"""
LIMITATIONS = """## Limitations

A small research model trained with gpt2lab: it continues text in the style of its training data and knows
nothing else. Its output is neither factual nor safe, carries the biases of that data, and should not be shown
to people unreviewed. It reads at most its context of tokens: longer inputs must be cut (gpt2lab's generation
slides the window by itself)."""
CITATION = """## Citation

```bibtex
@article{radford2019language,
  title = {Language Models are Unsupervised Multitask Learners},
  author = {Radford, Alec and Wu, Jeff and Child, Rewon and Luan, David and Amodei, Dario and Sutskever, Ilya},
  year = {2019}
}
```"""
