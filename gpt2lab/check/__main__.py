"""``python -m gpt2lab.check`` / ``gpt2lab check``: a model check-up before training."""

from gpt2lab.checkup.run import main

if __name__ == "__main__":
    main()
