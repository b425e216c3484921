"""VGG encoders without BatchNorm, as in the paper.

The embedding is global average pooling of the last conv block, so the
embedding is 512-d at any input size (the public code hard-coded 512 only at 32x32).
"""

from torch import nn

from runs.models.base import MODELS, Classifier, GlobalAvgPool, scaled

# Channel plans; "M" is a 2x2 max-pool. The last pool is replaced by global pooling.
PLANS = {
    11: [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    13: [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    16: [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
         512, 512, 512, "M"],
    19: [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
         512, 512, 512, 512, "M"],
}


def _vgg(depth, num_classes, width, in_channels) -> Classifier:
    layers, cin = [], in_channels
    for item in PLANS[depth][:-1]:
        if item == "M":
            layers.append(nn.MaxPool2d(2))
            continue
        cout = scaled(item, width)
        layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(inplace=True)]
        cin = cout
    layers += [GlobalAvgPool()]  # (B, 512 * width)
    encoder = nn.Sequential(*layers)
    for m in encoder.modules():  # torchvision's VGG init
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(m.bias)
    return Classifier(encoder, cin, num_classes)


@MODELS.register
def vgg11(num_classes=10, width=1.0, in_channels=3) -> Classifier:
    return _vgg(11, num_classes, width, in_channels)


@MODELS.register
def vgg13(num_classes=10, width=1.0, in_channels=3) -> Classifier:
    return _vgg(13, num_classes, width, in_channels)


@MODELS.register
def vgg16(num_classes=10, width=1.0, in_channels=3) -> Classifier:
    return _vgg(16, num_classes, width, in_channels)


@MODELS.register
def vgg19(num_classes=10, width=1.0, in_channels=3) -> Classifier:
    return _vgg(19, num_classes, width, in_channels)
