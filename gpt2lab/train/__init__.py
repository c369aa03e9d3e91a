"""Training: the run itself (``run``), its config checks (``checks``) and the Python API (``api``)."""
