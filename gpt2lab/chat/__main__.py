"""``python -m gpt2lab.chat`` / ``gpt2lab chat``: talk to a checkpoint in the terminal."""

from gpt2lab.inference.chat import main

if __name__ == "__main__":
    main()
