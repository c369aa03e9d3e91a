"""``python -m gpt2lab.runs`` / ``gpt2lab runs``: a table of the runs under a directory."""

from gpt2lab.runs.table import main

if __name__ == "__main__":
    main()
