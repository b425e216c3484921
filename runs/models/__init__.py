"""Model registry: `create_model(name, num_classes=10, width=1.0, in_channels=3, seed=0, **opts)`.

Every model is a `Classifier`: `encoder` (image -> embedding), `fc` (embedding -> logits,
replaceable) and `embed_dim`. Weights come from an explicit seed, so the same seed gives
bit-identical weights: the paper rebuilds its random teacher from a seed alone. Keyword
options of a factory (vgg11(pool="max", norm="none"), resnet20(shortcut="projection"), ...)
are recorded in `model.spec`; `parse_options(name, ("pool=avg",))` reads them from the CLI.

Your own model: `@register` a factory `fn(num_classes, width, in_channels, **kw)` returning
a Classifier, or pass `--model my_package.my_module:factory` to any CLI (see base.py);
`allow("my_package.my_module")` lets checkpoints naming that module load in Python.
"""

# Importing the families registers their names.
from runs.models import head, resnet, small, vgg, vit  # noqa: F401
from runs.models.base import (
                              MODELS,
                              Classifier,
                              allow,
                              create_model,
                              model_spec,
                              parse_options,
                              register,
)
from runs.models.head import create_head

__all__ = ["MODELS", "Classifier", "allow", "create_head", "create_model", "model_spec",
           "parse_options", "register"]
