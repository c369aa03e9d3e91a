"""Training: the run as stages (``run``), the plan they read (``plan``), its config checks (``checks``) and the
Python API (``api``)."""
