"""ResNets with the CIFAR stem (3x3 stride-1 conv, no max-pool) and He et al.'s CIFAR ResNets.

resnet18/34/50 reuse torchvision's blocks and init (Kaiming), so weights match what the
paper's code drew; only the stem changes. resnet20/56 are the 16-32-64 CIFAR networks with
parameter-free (option A) shortcuts.
"""

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet as tv

from runs.models.base import MODELS, Classifier, GlobalAvgPool, scaled


def _torchvision_encoder(block, layers, width, in_channels) -> tuple[nn.Module, int]:
    net = tv.ResNet(block, [1, 1, 1, 1])
    # torchvision sizes the stages from a fixed (64, 128, 256, 512) plan; rebuild every
    # stage with scaled planes so width multipliers shrink the whole network.
    planes = [scaled(p, width) for p in (64, 128, 256, 512)]
    net.inplanes = planes[0]
    net.conv1 = nn.Conv2d(in_channels, planes[0], 3, stride=1, padding=1, bias=False)
    net.bn1 = nn.BatchNorm2d(planes[0])
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
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _resnet(block, layers, num_classes, width, in_channels) -> Classifier:
    encoder, embed_dim = _torchvision_encoder(block, layers, width, in_channels)
    return Classifier(encoder, embed_dim, num_classes)


@MODELS.register
def resnet18(num_classes=10, width=1.0, in_channels=3) -> Classifier:
    return _resnet(tv.BasicBlock, [2, 2, 2, 2], num_classes, width, in_channels)


@MODELS.register
def resnet34(num_classes=10, width=1.0, in_channels=3) -> Classifier:
    return _resnet(tv.BasicBlock, [3, 4, 6, 3], num_classes, width, in_channels)


@MODELS.register
def resnet50(num_classes=10, width=1.0, in_channels=3) -> Classifier:
    return _resnet(tv.Bottleneck, [3, 4, 6, 3], num_classes, width, in_channels)


class _PadShortcut(nn.Module):
    """Option-A shortcut: subsample by 2 and zero-pad channels (no parameters)."""

    def __init__(self, extra_channels: int):
        super().__init__()
        self.extra = extra_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, ::2, ::2]
        return F.pad(x, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))


class _CifarBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = _PadShortcut(cout - cin) if stride != 1 or cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def _cifar_resnet(depth, num_classes, width, in_channels) -> Classifier:
    n = (depth - 2) // 6  # blocks per stage
    widths = [scaled(c, width) for c in (16, 32, 64)]
    layers = [nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False),
              nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True)]
    cin = widths[0]
    for stage, cout in enumerate(widths):
        for i in range(n):
            layers.append(_CifarBlock(cin, cout, 2 if stage > 0 and i == 0 else 1))
            cin = cout
    layers += [GlobalAvgPool()]
    encoder = nn.Sequential(*layers)
    for m in encoder.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return Classifier(encoder, widths[2], num_classes)


@MODELS.register
def resnet20(num_classes=10, width=1.0, in_channels=3) -> Classifier:
    return _cifar_resnet(20, num_classes, width, in_channels)


@MODELS.register
def resnet56(num_classes=10, width=1.0, in_channels=3) -> Classifier:
    return _cifar_resnet(56, num_classes, width, in_channels)
