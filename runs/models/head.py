"""The DINO projection head of the paper (App. E).

MLP in_dim -> hidden -> hidden (GELU, no BN) -> Linear to the bottleneck (bias), L2-normalise,
then a weight-normalised Linear bottleneck -> out_dim without bias. The normalisation is
really applied in forward (the public code computed it and then used the raw weight): every
effective row has unit norm, as DINO's weight norm with its gain frozen at 1.
"""

import torch
import torch.nn.functional as F
from torch import nn

from runs.models.base import BUILDERS

# The recipe's student init (App. E): theta_S(alpha) = ((1 - alpha) theta_T + alpha theta_fresh)
# / delta, encoder and head, with alpha tiny but not 0: the student starts next to its
# teacher. DistillConfig's default; probes compare a run's alpha against it.
RECIPE_ALPHA = 1e-10


class NormedLinear(nn.Module):
    """Linear without bias whose rows are L2-normalised on every forward."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        nn.init.trunc_normal_(self.weight, std=0.02)

    def effective_weight(self) -> torch.Tensor:
        return F.normalize(self.weight, dim=1)  # (out, in), unit rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.effective_weight())


class DINOHead(nn.Module):
    def __init__(self, in_dim: int, out_dim: int = 65536, hidden_dim: int = 2048,
                 bottleneck_dim: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(),
                                 nn.Linear(hidden_dim, hidden_dim), nn.GELU(),
                                 nn.Linear(hidden_dim, bottleneck_dim))
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last = NormedLinear(bottleneck_dim, out_dim)
        self.spec: dict = {}

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        z = F.normalize(self.mlp(embedding), dim=-1)  # (B, bottleneck), unit norm
        return self.last(z)  # (B, out_dim) logits, each in [-1, 1]


def create_head(name: str = "dino_head", in_dim: int = 512, out_dim: int = 65536,
                hidden_dim: int = 2048, bottleneck_dim: int = 256, seed: int = 0) -> DINOHead:
    """A DINO head with weights from `seed` (global RNG untouched), like `create_model`."""
    if name != "dino_head":
        raise ValueError(f"unknown head {name!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = DINOHead(in_dim, out_dim, hidden_dim, bottleneck_dim)
    head.spec = dict(registry="head", name=name, in_dim=in_dim, out_dim=out_dim,
                     hidden_dim=hidden_dim, bottleneck_dim=bottleneck_dim, seed=seed)
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
