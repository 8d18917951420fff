"""lmsys: train and serve large language models with JAX/XLA."""

__version__ = "0.1.0"
