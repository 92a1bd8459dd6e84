"""vitlab: Vision Transformer experiments with PyTorch Lightning and Hydra."""

__version__ = "0.1.0"
