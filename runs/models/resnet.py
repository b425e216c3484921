"""ResNets with the CIFAR stem (3x3 stride-1 conv, no max-pool) and He et al.'s CIFAR ResNets.

resnet18/34/50 reuse torchvision's blocks and init (Kaiming), so weights match what the
paper's code drew; only the stem changes. norm (runs.models.norms): "batch" (the paper's),
"layer", "group", "instance" or "none", in every block, the stem and the projections.

resnet20/56 are the 16-32-64 CIFAR networks. shortcut="projection" (the default) is the
paper's code: torchvision's BasicBlock with a 1x1 conv (stride 2) + norm projection where the
shape changes, under torchvision's names (conv1, bn1, layer1..3, layerK.0.downsample.0 = the
1x1 conv, layerK.0.downsample.1 = its norm), so the paper's `enc.*` keys are `encoder.*`.
shortcut="A": He et al.'s parameter-free shortcut (subsample, zero-pad channels) in this
toolkit's earlier nn.Sequential layout (kept for its checkpoints).
"""

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet as tv

from runs.models.base import MODELS, Classifier, GlobalAvgPool, legacy, scaled
from runs.models.norms import Norm, check_norm, norm_layer

Shortcut = Literal["projection", "A"]


def _norm_factory(norm: str):
    """torchvision's norm_layer: a callable channels -> module."""
    check_norm(norm)
    return lambda channels: norm_layer(norm, channels)


def _torchvision_encoder(block, layers, width, in_channels, norm) -> tuple[nn.Module, int]:
    make_norm = _norm_factory(norm)
    # The throwaway full-width net keeps the RNG stream (and so every seed's weights) as
    # before the norm option; its layers are all rebuilt below.
    net = tv.ResNet(block, [1, 1, 1, 1], norm_layer=make_norm)
    # torchvision sizes the stages from a fixed (64, 128, 256, 512) plan; rebuild every
    # stage with scaled planes so width multipliers shrink the whole network.
    planes = [scaled(p, width) for p in (64, 128, 256, 512)]
    net.inplanes = planes[0]
    net.conv1 = nn.Conv2d(in_channels, planes[0], 3, stride=1, padding=1, bias=False)
    net.bn1 = make_norm(planes[0])
    net.maxpool = nn.Identity()
    net.layer1 = net._make_layer(block, planes[0], layers[0])
    net.layer2 = net._make_layer(block, planes[1], layers[1], stride=2)
    net.layer3 = net._make_layer(block, planes[2], layers[2], stride=2)
    net.layer4 = net._make_layer(block, planes[3], layers[3], stride=2)
    _kaiming_like_torchvision(net)
    embed_dim = planes[3] * block.expansion
    net.avgpool = GlobalAvgPool()  # (B, C): torchvision's flatten after it is a no-op
    net.fc = nn.Identity()  # the encoder ends at global average pooling
    return net, embed_dim


def _kaiming_like_torchvision(net: nn.Module) -> None:
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d | nn.GroupNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _resnet(block, layers, num_classes, width, in_channels, norm) -> Classifier:
    encoder, embed_dim = _torchvision_encoder(block, layers, width, in_channels, norm)
    return Classifier(encoder, embed_dim, num_classes)


@MODELS.register
def resnet18(num_classes=10, width=1.0, in_channels=3, norm: Norm = "batch") -> Classifier:
    return _resnet(tv.BasicBlock, [2, 2, 2, 2], num_classes, width, in_channels, norm)


@MODELS.register
def resnet34(num_classes=10, width=1.0, in_channels=3, norm: Norm = "batch") -> Classifier:
    return _resnet(tv.BasicBlock, [3, 4, 6, 3], num_classes, width, in_channels, norm)


@MODELS.register
def resnet50(num_classes=10, width=1.0, in_channels=3, norm: Norm = "batch") -> Classifier:
    return _resnet(tv.Bottleneck, [3, 4, 6, 3], num_classes, width, in_channels, norm)


class CifarResNet(nn.Module):
    """The paper's code's CIFAR ResNet: torchvision's ResNet with three stages.

    conv1 (3x3, stride 1) -> bn1 -> ReLU -> layer1..3 (BasicBlocks, stride 1, 2, 2) ->
    global average pool: (B, C, H, W) -> (B, widths[2]). Projection shortcuts (1x1 conv with
    the block's stride, then norm) in layerK.0.downsample where the shape changes.
    """

    def __init__(self, blocks: int, widths: list[int], in_channels: int, norm: str):
        super().__init__()
        make_norm = _norm_factory(norm)
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = make_norm(widths[0])
        self.relu = nn.ReLU(inplace=True)
        cin, stages = widths[0], []
        for stage, cout in enumerate(widths):
            stride = 1 if stage == 0 else 2
            downsample = None
            if stride != 1 or cin != cout:
                downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                           make_norm(cout))
            layer = [tv.BasicBlock(cin, cout, stride, downsample, norm_layer=make_norm)]
            layer += [tv.BasicBlock(cout, cout, norm_layer=make_norm) for _ in range(blocks - 1)]
            stages.append(nn.Sequential(*layer))
            cin = cout
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = GlobalAvgPool()
        _kaiming_like_torchvision(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))  # (B, w0, H, W)
        x = self.layer3(self.layer2(self.layer1(x)))  # (B, w2, H / 4, W / 4)
        return self.avgpool(x)  # (B, w2)


class _PadShortcut(nn.Module):
    """Option-A shortcut: subsample by 2 and zero-pad channels (no parameters)."""

    def __init__(self, extra_channels: int):
        super().__init__()
        self.extra = extra_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, ::2, ::2]
        return F.pad(x, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))


class _CifarBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, norm: str = "batch"):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = norm_layer(norm, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = norm_layer(norm, cout)
        self.shortcut = _PadShortcut(cout - cin) if stride != 1 or cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def _option_a_encoder(n, widths, in_channels, norm) -> nn.Module:
    """The option-A network as nn.Sequential (indices as in earlier checkpoints)."""
    layers = [nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False),
              norm_layer(norm, widths[0]), nn.ReLU(inplace=True)]
    cin = widths[0]
    for stage, cout in enumerate(widths):
        for i in range(n):
            layers.append(_CifarBlock(cin, cout, 2 if stage > 0 and i == 0 else 1, norm))
            cin = cout
    layers += [GlobalAvgPool()]
    encoder = nn.Sequential(*layers)
    for m in encoder.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return encoder


def _cifar_resnet(depth, num_classes, width, in_channels, shortcut, norm) -> Classifier:
    check_norm(norm)
    n = (depth - 2) // 6  # blocks per stage
    widths = [scaled(c, width) for c in (16, 32, 64)]
    if shortcut == "projection":
        encoder = CifarResNet(n, widths, in_channels, norm)
    else:
        encoder = _option_a_encoder(n, widths, in_channels, norm)
    return Classifier(encoder, widths[2], num_classes)


@MODELS.register
@legacy(shortcut="A")  # checkpoints written before `shortcut` existed had option A
def resnet20(num_classes=10, width=1.0, in_channels=3, shortcut: Shortcut = "projection",
             norm: Norm = "batch") -> Classifier:
    return _cifar_resnet(20, num_classes, width, in_channels, shortcut, norm)


@MODELS.register
@legacy(shortcut="A")
def resnet56(num_classes=10, width=1.0, in_channels=3, shortcut: Shortcut = "projection",
             norm: Norm = "batch") -> Classifier:
    return _cifar_resnet(56, num_classes, width, in_channels, shortcut, norm)
