"""The recipes in ``conf/preset/``: the catalog, and the probe that times them on this machine."""
