"""Model registry: `create_model(name, num_classes=10, width=1.0, in_channels=3, seed=0)`.

Every model is a `Classifier`: `encoder` (image -> embedding), `fc` (embedding -> logits,
replaceable) and `embed_dim`. Weights come from an explicit seed, so the same seed gives
bit-identical weights: the paper rebuilds its random teacher from a seed alone.
"""

# Importing the families registers their names.
from runs.models import head, resnet, small, vgg  # noqa: F401
from runs.models.base import MODELS, Classifier, create_model, model_spec

__all__ = ["MODELS", "Classifier", "create_model", "model_spec"]
