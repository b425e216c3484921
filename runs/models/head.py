"""The DINO projection head of the paper (App. E), as the paper's code computes it.

dino_head: MLP in_dim -> hidden -> hidden (GELU, no BN) -> Linear to the bottleneck (bias),
L2-normalise, then a Linear bottleneck -> out_dim without bias. The paper calls that last
layer weight-normalised, but its code (safelix/dinopl, dinopl/modules/linear.py) computes the
row-normalised weight and multiplies by the RAW one, so the paper's numbers come from a raw
last layer drawn trunc-normal(std 0.02): `last="raw"` (the default) is that layer;
`last="normed"` applies the unit-row normalisation the text describes (rows of norm 1, as
DINO's weight norm with its gain frozen at 1; this toolkit's behaviour before the raw default).
bottleneck_dim=0: no bottleneck and no L2 normalisation, the MLP's second hidden layer feeds
the last layer. name="linear": the last layer alone, in_dim -> out_dim (no MLP).
"""

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from runs.errors import UserError
from runs.models.base import BUILDERS, check_parameter_count, legacy

# The recipe's student init (App. E): theta_S(alpha) = ((1 - alpha) theta_T + alpha theta_fresh)
# / delta, encoder and head. The paper's main figures use alpha = 0 exactly (the student starts
# AT its teacher; the IMP runs used 1e-10). DistillConfig's default; probes compare a run's alpha
# against it.
RECIPE_ALPHA = 0.0
HEADS = ("dino_head", "linear")
LASTS = ("raw", "normed")


class LastLinear(nn.Module):
    """Linear without bias, trunc-normal(0.02) init; `normed` rows L2-normalised on every
    forward (unit rows), else the raw weight (the paper's code)."""

    def __init__(self, in_features: int, out_features: int, normed: bool):
        super().__init__()
        self.normed = normed
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        nn.init.trunc_normal_(self.weight, std=0.02)

    def effective_weight(self) -> torch.Tensor:
        """(out, in) the weight the forward multiplies by: unit rows when normed."""
        return F.normalize(self.weight, dim=1) if self.normed else self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.effective_weight())

    def extra_repr(self) -> str:
        out, inp = self.weight.shape
        return f"in_features={inp}, out_features={out}, normed={self.normed}"


class DINOHead(nn.Module):
    """embedding (B, in_dim) -> logits (B, out_dim). State keys mlp.0/2(/4) and last.weight."""

    def __init__(self, in_dim: int, out_dim: int = 65536, hidden_dim: int = 2048,
                 bottleneck_dim: int = 256, last: str = "raw"):
        super().__init__()
        layers = [nn.Linear(in_dim, hidden_dim), nn.GELU(),
                  nn.Linear(hidden_dim, hidden_dim), nn.GELU()]
        if bottleneck_dim > 0:
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
        self.mlp = nn.Sequential(*layers)
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.bottleneck = bottleneck_dim > 0
        self.last = LastLinear(bottleneck_dim if self.bottleneck else hidden_dim, out_dim,
                               normed=last == "normed")
        self.spec: dict = {}

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        z = self.mlp(embedding)  # (B, bottleneck) or (B, hidden)
        if self.bottleneck:
            z = F.normalize(z, dim=-1)  # unit norm: with normed rows each logit is a cosine
        return self.last(z)  # (B, out_dim)


class LinearHead(nn.Module):
    """embedding (B, in_dim) -> logits (B, out_dim) through one bias-free Linear (`last`)."""

    def __init__(self, in_dim: int, out_dim: int, last: str = "raw"):
        super().__init__()
        self.last = LastLinear(in_dim, out_dim, normed=last == "normed")
        self.spec: dict = {}

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        return self.last(embedding)


@legacy(last="normed")  # heads saved before `last` existed normalised their rows
def create_head(name: Literal["dino_head", "linear"] = "dino_head", in_dim: int = 512,
                out_dim: int = 65536, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                seed: int = 0, last: Literal["raw", "normed"] = "raw") -> nn.Module:
    """A projection head with weights from `seed` (global RNG untouched), like `create_model`.

    name "dino_head" (MLP, L2 bottleneck unless bottleneck_dim=0, last layer) or "linear"
    (the last layer alone; hidden_dim and bottleneck_dim unused but recorded). last "raw" (the
    paper's code) or "normed" (unit rows). `head.spec` records every option.
    """
    if name not in HEADS:
        raise UserError(f"unknown head {name!r}; valid: {', '.join(HEADS)}")
    if last not in LASTS:
        raise UserError(f"head last={last!r}: valid: {', '.join(LASTS)}")
    if min(in_dim, out_dim, hidden_dim) < 1 or bottleneck_dim < 0:
        raise UserError(f"head {name}: in_dim, out_dim and hidden_dim must be positive and "
                        f"bottleneck_dim >= 0 (got {in_dim}, {out_dim}, {hidden_dim}, "
                        f"{bottleneck_dim})")
    check_parameter_count(  # before any weight exists: --out-dim 1e11 is refused, not tried
        lambda: (DINOHead(in_dim, out_dim, hidden_dim, bottleneck_dim, last)
                 if name == "dino_head" else LinearHead(in_dim, out_dim, last)),
        f"head {name} (--out-dim {out_dim}, --hidden-dim {hidden_dim}, --bottleneck-dim "
        f"{bottleneck_dim})", "--out-dim, --hidden-dim or --bottleneck-dim")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = (DINOHead(in_dim, out_dim, hidden_dim, bottleneck_dim, last)
                if name == "dino_head" else LinearHead(in_dim, out_dim, last))
    head.spec = dict(registry="head", name=name, in_dim=in_dim, out_dim=out_dim,
                     hidden_dim=hidden_dim, bottleneck_dim=bottleneck_dim, seed=seed, last=last)
    return head


BUILDERS["head"] = create_head


class DinoNet(nn.Module):
    """Encoder + DINO head as one module: images (B, C, H, W) -> head logits (B, m).

    `model`: the Classifier whose encoder is used (its fc is carried, unused); `encoder`
    gives the embedding (B, D) that probes read. State keys `model.*`, `head.*`.
    """

    def __init__(self, model: nn.Module, head: nn.Module):
        super().__init__()
        self.model, self.head = model, head

    @property
    def encoder(self) -> nn.Module:
        return self.model.encoder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.model.encoder(x))
