"""Model registry (SPEC §6). Every model splits ``forward_features`` / ``forward_head`` (timm) and
``forward`` returns ``(features, logits)``, so losses get penultimate features without hooks."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from orchestrator.config import ExperimentConfig, model_head
from orchestrator.registry import Registry


class CosineHead(nn.Module):
    """Logits ``cos(f, w_c)`` in [-1, 1]: the normalised features against normalised class weights,
    with no bias. LDAM's margins are subtracted from these and the result scaled by ``s`` (Cao et
    al., NeurIPS 2019, whose reference code pairs its loss with this classifier); on the unbounded
    logits of a linear head a margin of 0.5 has no fixed meaning, and ``s`` only rescales them."""

    def __init__(self, feature_dim: int, num_classes: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_classes, feature_dim) / math.sqrt(feature_dim))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return F.linear(F.normalize(features, dim=1), F.normalize(self.weight, dim=1))


#: Classifier heads by ``model.head`` name, each built from (feature_dim, num_classes).
HEADS: dict[str, type[nn.Module]] = {"linear": nn.Linear, "cosine": CosineHead}


class FeatureClassifier(nn.Module):
    """A backbone producing ``feature_dim`` features and a classifier head (linear unless reset)."""

    def __init__(self, backbone: nn.Module, feature_dim: int, num_classes: int):
        super().__init__()
        self.backbone, self.feature_dim, self.num_classes = backbone, feature_dim, num_classes
        self.head: nn.Module = nn.Linear(feature_dim, num_classes)

    def reset_head(self, kind: str) -> None:
        """Replace the head by a new one of ``kind`` (a key of :data:`HEADS`), as timm's ``reset_classifier``."""
        self.head = HEADS[kind](self.feature_dim, self.num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.forward_features(x)
        return features, self.forward_head(features)


MODELS: Registry[FeatureClassifier] = Registry("model", "model.name")


def create_model(name: str, input_shape: tuple[int, ...], num_classes: int, head: str = "linear") -> FeatureClassifier:
    model = MODELS.create(name, input_shape=input_shape, num_classes=num_classes)
    if head != "linear":
        model.reset_head(head)
    return model


def build_model(config: ExperimentConfig, input_shape: tuple[int, ...], num_classes: int) -> FeatureClassifier:
    """The model a run's config names, with the head it asks for (``model.head``; "auto" follows the loss)."""
    return create_model(config.model.name, input_shape, num_classes, model_head(config))


@MODELS.register("mlp")
def mlp(input_shape: tuple[int, ...], num_classes: int, width: int = 128, feature_dim: int = 64) -> FeatureClassifier:
    """Two hidden layers on the flattened input: 8x8 digits and synthetic feature vectors."""
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), width), nn.ReLU(),
                             nn.Linear(width, feature_dim), nn.ReLU())
    return FeatureClassifier(backbone, feature_dim, num_classes)


@MODELS.register("small_cnn")
def small_cnn(input_shape: tuple[int, ...], num_classes: int, width: int = 32,
              feature_dim: int = 128) -> FeatureClassifier:
    """Two conv-BN-ReLU-pool stages and a dense layer, for 28x28 (or 8x8) grey images."""
    channels, height, width_px = input_shape
    backbone = nn.Sequential(
        nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(2 * width * (height // 4) * (width_px // 4), feature_dim), nn.ReLU())
    return FeatureClassifier(backbone, feature_dim, num_classes)


class _BasicBlock(nn.Module):
    """ResNet basic block with the option-A (zero-padded identity) shortcut of He et al. for CIFAR."""

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.pad = planes - in_planes if (stride != 1 or in_planes != planes) else 0
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x[:, :, :: self.stride, :: self.stride] if self.stride != 1 else x
        if self.pad:
            shortcut = F.pad(shortcut, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        return F.relu(out + shortcut)


@MODELS.register("resnet32")
def resnet32(input_shape: tuple[int, ...], num_classes: int) -> FeatureClassifier:
    """ResNet-32 for CIFAR (3 stages x 5 blocks, 16/32/64 channels, 64-d features): the standard
    long-tailed CIFAR backbone (Cao et al., 2019)."""
    layers: list[nn.Module] = [nn.Conv2d(input_shape[0], 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU()]
    in_planes = 16
    for planes, stride in ((16, 1), (32, 2), (64, 2)):
        for block in range(5):
            layers.append(_BasicBlock(in_planes, planes, stride if block == 0 else 1))
            in_planes = planes
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    model = FeatureClassifier(nn.Sequential(*layers), 64, num_classes)
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(module.weight)
    return model


def _torchvision_backbone(name: str, num_classes: int) -> FeatureClassifier:
    import torchvision

    net = getattr(torchvision.models, name)(weights=None)
    feature_dim = net.fc.in_features
    net.fc = nn.Identity()
    return FeatureClassifier(net, feature_dim, num_classes)


@MODELS.register("resnet50")
def resnet50(input_shape: tuple[int, ...], num_classes: int) -> FeatureClassifier:
    """torchvision ResNet-50 (2048-d features), trained from scratch for ImageNet-LT / iNaturalist."""
    return _torchvision_backbone("resnet50", num_classes)


@MODELS.register("resnext50")
def resnext50(input_shape: tuple[int, ...], num_classes: int) -> FeatureClassifier:
    """torchvision ResNeXt-50 32x4d (2048-d features)."""
    return _torchvision_backbone("resnext50_32x4d", num_classes)
