"""``python -m gpt2lab.cli <verb>``: the ``gpt2lab`` console script."""

from gpt2lab.cli import main

if __name__ == "__main__":
    main()
