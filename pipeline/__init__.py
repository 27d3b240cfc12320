"""Reproducible CIFAR-10 classification and RNN image compression pipeline."""

__version__ = "0.1.0"
