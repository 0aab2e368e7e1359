"""Four small Fashion-MNIST CNNs, each built around one structure that channel pruning must handle.

Input ``[N, 1, 28, 28]`` (standardised), output logits ``[N, 10]``.

* ``resnet20``: ResNet-20 layout (3 stages x 3 basic blocks, residual Add, BN, 1x1 projection shortcuts)
* ``mobilenet_v2``: inverted residuals (1x1 expand, 3x3 depthwise, linear 1x1 project, Add), BN, ReLU6
* ``densenet``: dense blocks (BN-ReLU-Conv layers whose outputs are Concat-ed) and transitions
* ``se_net``: VGG-style conv stages, each ending in a squeeze-and-excitation block (Mul by a sigmoid gate)
"""
from __future__ import annotations

import torch
from torch import nn

NUM_CLASSES = 10


def conv_bn(cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    """Conv (no bias) followed by BatchNorm, as a list of layers."""
    return [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]


def classifier(channels: int) -> nn.Sequential:
    """Global average pool, flatten, linear layer to the class logits."""
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, NUM_CLASSES))


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 conv-BN, residual Add (1x1 conv-BN projection when the shape changes)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(*conv_bn(cin, cout, 3, stride), nn.ReLU(inplace=True), *conv_bn(cout, cout))
        self.shortcut = nn.Identity() if stride == 1 and cin == cout else nn.Sequential(*conv_bn(cin, cout, 1, stride))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


class ResNet20(nn.Module):
    """3x3 stem at 28 px, three stages of three basic blocks (widths 16/32/64 at 14/7/4 px), linear head."""

    def __init__(self, widths: tuple[int, ...] = (16, 32, 64), blocks: int = 3):
        super().__init__()
        layers, cin = [*conv_bn(1, widths[0]), nn.ReLU(inplace=True)], widths[0]
        for stage, width in enumerate(widths):
            for block in range(blocks):
                layers.append(BasicBlock(cin, width, 2 if block == 0 else 1))
                cin = width
        self.features = nn.Sequential(*layers)
        self.head = classifier(cin)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand, 3x3 depthwise, linear 1x1 project; Add when shapes match."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        self.use_residual = stride == 1 and cin == cout
        self.body = nn.Sequential(
            *conv_bn(cin, hidden, 1), nn.ReLU6(inplace=True),
            *conv_bn(hidden, hidden, 3, stride, groups=hidden), nn.ReLU6(inplace=True),
            *conv_bn(hidden, cout, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x) if self.use_residual else self.body(x)


class MobileNetV2(nn.Module):
    """Stem, inverted-residual stages (expansion, width, repeats, stride), 1x1 conv to 256, linear head."""

    STAGES = ((1, 16, 1, 1), (4, 24, 2, 2), (4, 32, 2, 1), (4, 64, 3, 2), (4, 96, 1, 1))

    def __init__(self, stem: int = 16, last: int = 256):
        super().__init__()
        layers, cin = [*conv_bn(1, stem, 3, 2), nn.ReLU6(inplace=True)], stem
        for expand, width, repeats, stride in self.STAGES:
            for i in range(repeats):
                layers.append(InvertedResidual(cin, width, stride if i == 0 else 1, expand))
                cin = width
        layers += [*conv_bn(cin, last, 1), nn.ReLU6(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.head = classifier(last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class DenseLayer(nn.Module):
    """BN-ReLU-Conv3x3 producing ``growth`` new channels, concatenated to its input."""

    def __init__(self, cin: int, growth: int):
        super().__init__()
        self.body = nn.Sequential(nn.BatchNorm2d(cin), nn.ReLU(inplace=True),
                                  nn.Conv2d(cin, growth, 3, 1, 1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.body(x)], dim=1)


class DenseNet(nn.Module):
    """Stem, three dense blocks joined by BN-ReLU-Conv1x1-AvgPool transitions (compression 0.5), head."""

    def __init__(self, stem: int = 24, growth: int = 12, layers_per_block: int = 4, blocks: int = 3):
        super().__init__()
        layers, cin = [nn.Conv2d(1, stem, 3, 2, 1, bias=False)], stem
        for block in range(blocks):
            for _ in range(layers_per_block):
                layers.append(DenseLayer(cin, growth))
                cin += growth
            if block < blocks - 1:
                cout = cin // 2
                layers += [nn.BatchNorm2d(cin), nn.ReLU(inplace=True), nn.Conv2d(cin, cout, 1, bias=False),
                           nn.AvgPool2d(2)]
                cin = cout
        layers += [nn.BatchNorm2d(cin), nn.ReLU(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.head = classifier(cin)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class SqueezeExcite(nn.Module):
    """Global pool, 1x1 reduce, ReLU, 1x1 expand, sigmoid; the input is multiplied by that gate."""

    def __init__(self, channels: int, reduction: int = 4):
        super().__init__()
        self.gate = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(channels, channels // reduction, 1),
                                  nn.ReLU(inplace=True), nn.Conv2d(channels // reduction, channels, 1), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(x)


class SENet(nn.Module):
    """Three stages of two conv-BN-ReLU and an SE block (widths 16/32/64), max-pooling between, head."""

    def __init__(self, widths: tuple[int, ...] = (16, 32, 64)):
        super().__init__()
        layers, cin = [], 1
        for stage, width in enumerate(widths):
            if stage > 0:
                layers.append(nn.MaxPool2d(2))
            layers += [*conv_bn(cin, width), nn.ReLU(inplace=True), *conv_bn(width, width), nn.ReLU(inplace=True),
                       SqueezeExcite(width)]
            cin = width
        self.features = nn.Sequential(*layers)
        self.head = classifier(cin)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


NETS = {"resnet20": ResNet20, "mobilenet_v2": MobileNetV2, "densenet": DenseNet, "se_net": SENet}
