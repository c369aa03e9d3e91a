"""``python -m gpt2lab.serve`` / ``gpt2lab serve``: a checkpoint (or an ONNX export) behind OpenAI's HTTP API.

python -m gpt2lab.serve ckpt=<.ckpt file | run directory | last | best> [port=8000] [host=127.0.0.1] [device=auto]
python -m gpt2lab.serve onnx=<export dir>
"""

from omegaconf import DictConfig

from gpt2lab.cli.app import hydra_app
from gpt2lab.errors import ConfigError


def run(cfg: DictConfig) -> None:
    """Serve what ``conf/serve.yaml`` describes until Ctrl-C."""
    try:
        from gpt2lab.serve.server import serve
    except ModuleNotFoundError as e:
        raise ConfigError(
            f"gpt2lab serve needs {e.name}, which is not installed: pip install 'gpt2lab[serve]'"
        ) from None
    serve(cfg)


main = hydra_app("serve", run)

if __name__ == "__main__":
    main()
