"""Small models for tests and CPU demos: a 3-block convnet with BN and an MLP."""

from torch import nn

from runs.models.base import MODELS, Classifier, GlobalAvgPool, scaled


@MODELS.register
def convnet(num_classes=10, width=1.0, in_channels=3) -> Classifier:
    """Three conv3x3-BN-ReLU blocks (32, 64, 128 channels x width), max-pool between blocks,
    global average pooling: works from 8x8 inputs upward."""
    chans = [scaled(c, width) for c in (32, 64, 128)]
    layers, cin = [], in_channels
    for i, cout in enumerate(chans):
        layers += [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                   nn.ReLU(inplace=True)]
        if i < len(chans) - 1:
            layers.append(nn.MaxPool2d(2))
        cin = cout
    layers += [GlobalAvgPool()]  # (B, 128 * width)
    return Classifier(nn.Sequential(*layers), cin, num_classes)


@MODELS.register
def mlp(num_classes=10, width=1.0, in_channels=3, image_size=32) -> Classifier:
    """Flatten -> two hidden ReLU layers of 256 x width. Needs the input size up front."""
    hidden = scaled(256, width)
    in_features = in_channels * image_size * image_size
    encoder = nn.Sequential(nn.Flatten(), nn.Linear(in_features, hidden), nn.ReLU(inplace=True),
                            nn.Linear(hidden, hidden), nn.ReLU(inplace=True))
    return Classifier(encoder, hidden, num_classes)
