from vitlab.data.base import InMemoryImageDataModule, InMemoryImages
from vitlab.data.cifar import CIFAR10DataModule, CIFAR100DataModule
from vitlab.data.mnist import FashionMNISTDataModule, MNISTDataModule, read_idx
from vitlab.data.synthetic import SyntheticDataModule

__all__ = [
    "CIFAR100DataModule",
    "CIFAR10DataModule",
    "FashionMNISTDataModule",
    "InMemoryImageDataModule",
    "InMemoryImages",
    "MNISTDataModule",
    "SyntheticDataModule",
    "read_idx",
]
