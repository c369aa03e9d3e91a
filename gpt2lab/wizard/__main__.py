"""``python -m gpt2lab.wizard`` / ``gpt2lab wizard``: a recipe of one's own, step by step."""

from gpt2lab.wizard.wizard import main

if __name__ == "__main__":
    main()
