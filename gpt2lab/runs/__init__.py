"""Runs on disk: reading run directories, and the table and figures made from them."""
