"""prm-factory: step-labelled training data for process reward models."""

__version__ = "0.1.0"
