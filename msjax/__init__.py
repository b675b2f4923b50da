"""msjax: Multi-Similarity loss with General Pair Weighting for deep metric learning, in JAX."""

__version__ = "0.1.0"
