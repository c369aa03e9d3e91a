"""Speed measurements: the training step, decoding and exports, and the plain-PyTorch reference loop. Nothing
outside this package imports it."""
