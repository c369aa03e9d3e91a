"""``python -m gpt2lab.serve`` / ``gpt2lab serve``: a checkpoint (or an ONNX export) behind OpenAI's HTTP API.

python -m gpt2lab.serve ckpt=<.ckpt file | run directory | last | best> [port=8000] [host=127.0.0.1] [device=auto]
python -m gpt2lab.serve onnx=<export dir>
"""

from gpt2lab.cli.app import hydra_app
from gpt2lab.serve.server import serve

main = hydra_app("serve", serve)

if __name__ == "__main__":
    main()
