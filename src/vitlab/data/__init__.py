from vitlab.data.base import InMemoryImageDataModule, InMemoryImages
from vitlab.data.mnist import DataError, FashionMNISTDataModule, MNISTDataModule, read_idx
from vitlab.data.synthetic import SyntheticDataModule

__all__ = [
    "DataError",
    "FashionMNISTDataModule",
    "InMemoryImageDataModule",
    "InMemoryImages",
    "MNISTDataModule",
    "SyntheticDataModule",
    "read_idx",
]
