"""VGG encoders as the paper's code builds them (torchvision's layout, no classifier MLP).

The embedding is a global pool of the last conv map. pool="max" (the default) is the paper's:
its code ends in the plan's last 2x2 max-pool and a flatten, which at 32x32 inputs is a max
over the last 2x2 map; a global max also gives 512-d embeddings at 64x64 (the paper's code
hard-coded 512 and only worked at 32x32). pool="avg": global average (this toolkit's earlier
embedding, kept for its checkpoints). norm (see runs.models.norms): "none" (the paper's VGG),
"batch", "layer", "group" or "instance", each conv -> norm -> ReLU as torchvision's vgg*_bn;
vgg11_bn..vgg19_bn are norm="batch". Encoder indices follow torchvision's `features`
(conv at i, norm at i + 1, ReLU after), so the paper's `enc.features.I.*` keys are `encoder.I.*`.
"""

from typing import Literal

from torch import nn

from runs.models.base import MODELS, Classifier, GlobalAvgPool, GlobalMaxPool, legacy, scaled
from runs.models.norms import Norm, check_norm, norm_layer

# Channel plans; "M" is a 2x2 max-pool. The last pool is replaced by global pooling.
PLANS = {
    11: [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    13: [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    16: [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
         512, 512, 512, "M"],
    19: [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
         512, 512, 512, 512, "M"],
}
Pool = Literal["max", "avg"]
POOLS = {"max": GlobalMaxPool, "avg": GlobalAvgPool}


def _vgg(depth, num_classes, width, in_channels, pool="max", norm="none") -> Classifier:
    check_norm(norm)
    layers, cin = [], in_channels
    for item in PLANS[depth][:-1]:
        if item == "M":
            layers.append(nn.MaxPool2d(2))
            continue
        cout = scaled(item, width)
        layers.append(nn.Conv2d(cin, cout, 3, padding=1))
        if norm != "none":  # no Identity: the paper's VGG's indices stay as they are
            layers.append(norm_layer(norm, cout))
        layers.append(nn.ReLU(inplace=True))
        cin = cout
    layers.append(POOLS[pool]())  # (B, 512 * width)
    encoder = nn.Sequential(*layers)
    for m in encoder.modules():  # torchvision's VGG init; norm layers start at weight 1, bias 0
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(m.bias)
    return Classifier(encoder, cin, num_classes)


@MODELS.register
@legacy(pool="avg")  # checkpoints written before `pool` existed averaged
def vgg11(num_classes=10, width=1.0, in_channels=3, pool: Pool = "max",
          norm: Norm = "none") -> Classifier:
    return _vgg(11, num_classes, width, in_channels, pool, norm)


@MODELS.register
@legacy(pool="avg")
def vgg13(num_classes=10, width=1.0, in_channels=3, pool: Pool = "max",
          norm: Norm = "none") -> Classifier:
    return _vgg(13, num_classes, width, in_channels, pool, norm)


@MODELS.register
@legacy(pool="avg")
def vgg16(num_classes=10, width=1.0, in_channels=3, pool: Pool = "max",
          norm: Norm = "none") -> Classifier:
    return _vgg(16, num_classes, width, in_channels, pool, norm)


@MODELS.register
@legacy(pool="avg")
def vgg19(num_classes=10, width=1.0, in_channels=3, pool: Pool = "max",
          norm: Norm = "none") -> Classifier:
    return _vgg(19, num_classes, width, in_channels, pool, norm)


@MODELS.register
def vgg11_bn(num_classes=10, width=1.0, in_channels=3, pool: Pool = "max") -> Classifier:
    return _vgg(11, num_classes, width, in_channels, pool, "batch")


@MODELS.register
def vgg13_bn(num_classes=10, width=1.0, in_channels=3, pool: Pool = "max") -> Classifier:
    return _vgg(13, num_classes, width, in_channels, pool, "batch")


@MODELS.register
def vgg16_bn(num_classes=10, width=1.0, in_channels=3, pool: Pool = "max") -> Classifier:
    return _vgg(16, num_classes, width, in_channels, pool, "batch")


@MODELS.register
def vgg19_bn(num_classes=10, width=1.0, in_channels=3, pool: Pool = "max") -> Classifier:
    return _vgg(19, num_classes, width, in_channels, pool, "batch")
