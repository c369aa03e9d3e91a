"""``python -m gpt2lab.train`` / ``gpt2lab train``: train a model."""

from gpt2lab.train.run import main

if __name__ == "__main__":
    main()
