"""Datamodules: each owns its data, finds it on disk offline and downloads when allowed."""

from structlab.data.base import ImageDataModule, MissingDatasetError
from structlab.data.cifar import CIFARDataModule
from structlab.data.fashion_mnist import FashionMNISTDataModule
from structlab.data.imagenet import ImageNetDataModule
from structlab.data.real_depth import RealDepthDataModule
from structlab.data.scenes import SceneDataModule
from structlab.data.synthetic import SyntheticImageDataModule
from structlab.data.synthetic_text import SyntheticTextDataModule
from structlab.data.text import TextDataModule

__all__ = [
    "CIFARDataModule",
    "FashionMNISTDataModule",
    "ImageDataModule",
    "ImageNetDataModule",
    "MissingDatasetError",
    "RealDepthDataModule",
    "SceneDataModule",
    "SyntheticImageDataModule",
    "SyntheticTextDataModule",
    "TextDataModule",
]
