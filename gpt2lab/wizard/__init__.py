"""The wizard: a recipe of ones own, asked step by step, written as ``conf/experiment/<name>.yaml``."""
