"""The models a run can train, chosen by `model.name`."""

from __future__ import annotations

import torch
from torch import nn

from .config import ConfigError


class SmallCNN(nn.Module):
    """Two 3x3 convolutions and two linear layers: about 0.2M parameters for 28x28 input."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(32 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class FedAvgCNN(nn.Module):
    """The CNN of McMahan et al. (2017), "Communication-Efficient Learning of Deep
    Networks from Decentralized Data": two 5x5 convolutions (32, 64), a 512-unit layer."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(64 * 7 * 7, 512), nn.ReLU(), nn.Linear(512, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def resnet18(in_channels: int = 3, num_classes: int = 10) -> nn.Module:
    """torchvision's ResNet-18 with the usual CIFAR stem: a 3x3 first convolution and no
    max-pool, since 32x32 images would otherwise shrink to 1x1 before the last stage."""
    import torchvision

    model = torchvision.models.resnet18(num_classes=num_classes)
    model.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


MODELS = {"cnn": SmallCNN, "fedavg_cnn": FedAvgCNN, "resnet18": resnet18}


def build_model(name: str, in_channels: int, image_size: int,
                num_classes: int = 10) -> nn.Module:
    if name in ("cnn", "fedavg_cnn") and image_size != 28:
        raise ConfigError(f"model.name = {name!r} expects 28x28 images, the dataset has "
                          f"{image_size}x{image_size}; use model.name=resnet18 for cifar10")
    return MODELS[name](in_channels=in_channels, num_classes=num_classes)
