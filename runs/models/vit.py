"""Vision Transformer encoders of the paper's scaling table: vit_tiny, vit_small, vit_base.

    name        dim  depth  heads    (dim x width, rounded to a multiple of heads)
    vit_tiny    192    12      3
    vit_small   384    12      6
    vit_base    768    12     12

Patch embedding (a conv of kernel = stride = patch, default 8: 16 patches at 32x32), a CLS
token and learned position embeddings for `image_size` x `image_size` inputs (default 32),
pre-norm blocks (LayerNorm -> attention -> residual, LayerNorm -> MLP 4x dim -> residual),
a final LayerNorm; the embedding is the CLS token (pool="cls") or the mean of the patch tokens
(pool="mean"). The paper's code reads the CLS token.

impl="dinopl" (the default) is the network the paper's code (safelix/dinopl models/vit.py)
builds, with its defects, since its numbers come from it:
- ONE block applied `depth` times: its `num_layers * [Block(...)]` repeats one module, so all
  depths share their weights (here `block`, applied 12 times);
- attention across the heads of each token, not across tokens: q, k, v reshaped to
  (B, L, H, E/H), scores (B, L, H, H), output transposed to (B, H, L, E/H) and reshaped to
  (B, L, E), which interleaves tokens and heads;
- a GELU after the MLP's second Linear as well;
- PyTorch's default init: Linear and conv uniform(+-1/sqrt(fan_in)), CLS token and position
  embeddings N(0, 1), LayerNorm weight 1 and bias 0.
impl="standard" is a ViT as DINO/timm build one: `depth` separate blocks, scaled dot-product
attention across tokens per head, no GELU after the MLP, trunc-normal(0.02) Linear weights,
CLS and position embeddings, zero biases.
State keys follow the paper's code (embedder.proj, cls_token, pos_embed, attention.qkv/proj,
layer_norm1/2, mlp.fc1/fc2, layer_norm), blocks under `block` (dinopl) or `blocks.K`.
Attention is written with matmuls: torch.func.vmap over parameter sets batches it natively.
"""

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from runs.errors import UserError
from runs.models.base import MODELS, Classifier

Pool = Literal["cls", "mean"]
Impl = Literal["dinopl", "standard"]
SIZES = {"vit_tiny": (192, 12, 3), "vit_small": (384, 12, 6), "vit_base": (768, 12, 12)}


class Attention(nn.Module):
    """(B, L, E) -> (B, L, E): multi-head self-attention, across tokens or (dinopl) heads."""

    def __init__(self, dim: int, heads: int, across_heads: bool):
        super().__init__()
        self.heads, self.across_heads = heads, across_heads
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, E = x.shape
        qkv = self.qkv(x).reshape(B, L, 3, E).permute(2, 0, 1, 3)  # (3, B, L, E)
        qkv = qkv.reshape(3, B, L, self.heads, E // self.heads)  # (3, B, L, H, E')
        if not self.across_heads:
            qkv = qkv.transpose(2, 3)  # (3, B, H, L, E'): attend across tokens
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = torch.softmax((q @ k.transpose(-2, -1)) * self.scale, dim=-1)
        out = attn @ v  # dinopl: (B, L, H, E'); standard: (B, H, L, E')
        # dinopl transposes (B, L, H, E') to (B, H, L, E') and reshapes that to (B, L, E);
        # standard puts the heads back beside each other per token.
        out = out.transpose(1, 2).reshape(B, L, E)
        return self.proj(out)


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, gelu_after: bool):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.gelu_after = gelu_after

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc2(F.gelu(self.fc1(x)))
        return F.gelu(x) if self.gelu_after else x


class Block(nn.Module):
    """Pre-norm transformer block, (B, L, E) -> (B, L, E)."""

    def __init__(self, dim: int, heads: int, dinopl: bool):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(dim)
        self.attention = Attention(dim, heads, across_heads=dinopl)
        self.layer_norm2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, 4 * dim, gelu_after=dinopl)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class PatchEmbedder(nn.Module):
    """(B, C, H, W) -> (B, (H / patch) * (W / patch), E), patches in row-major order."""

    def __init__(self, in_channels: int, dim: int, patch: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class ViT(nn.Module):
    """images (B, C, image_size, image_size) -> embeddings (B, dim)."""

    def __init__(self, dim: int, depth: int, heads: int, in_channels: int, patch: int,
                 image_size: int, pool: str, impl: str):
        super().__init__()
        self.image_size, self.patch, self.pool, self.depth = image_size, patch, pool, depth
        self.dinopl = impl == "dinopl"
        self.embedder = PatchEmbedder(in_channels, dim, patch)
        tokens = 1 + (image_size // patch) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, tokens, dim))
        if self.dinopl:
            self.block = Block(dim, heads, dinopl=True)  # shared by every depth
        else:
            self.blocks = nn.Sequential(*[Block(dim, heads, dinopl=False) for _ in range(depth)])
        self.layer_norm = nn.LayerNorm(dim)
        self._init()

    def _init(self) -> None:
        if self.dinopl:  # PyTorch defaults elsewhere, as the paper's code's reset_parameters
            nn.init.normal_(self.cls_token)
            nn.init.normal_(self.pos_embed)
            return
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        x = self.embedder(x)  # (B, N, E)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1) + self.pos_embed
        if self.dinopl:
            for _ in range(self.depth):
                x = self.block(x)
        else:
            x = self.blocks(x)
        x = self.layer_norm(x)  # (B, 1 + N, E)
        return x[:, 0] if self.pool == "cls" else x[:, 1:].mean(dim=1)  # (B, E)

    def _check(self, x: torch.Tensor) -> None:
        if tuple(x.shape[-2:]) != (self.image_size, self.image_size):
            raise UserError(f"ViT built for {self.image_size}x{self.image_size} images got "
                            f"{x.shape[-2]}x{x.shape[-1]}: pass --model-option "
                            f"image_size={x.shape[-1]} (square images, a multiple of patch="
                            f"{self.patch})")


def _vit(name, num_classes, width, in_channels, patch, pool, image_size, impl) -> Classifier:
    base, depth, heads = SIZES[name]
    if patch < 1 or image_size < 1 or image_size % patch:
        raise UserError(f"model {name}: image_size={image_size} must be a positive multiple "
                        f"of patch={patch} (--model-option image_size=..., patch=...)")
    dim = heads * max(1, round(base * width / heads))  # heads divide dim
    encoder = ViT(dim, depth, heads, in_channels, patch, image_size, pool, impl)
    return Classifier(encoder, dim, num_classes)


@MODELS.register
def vit_tiny(num_classes=10, width=1.0, in_channels=3, patch=8, pool: Pool = "cls",
             image_size=32, impl: Impl = "dinopl") -> Classifier:
    return _vit("vit_tiny", num_classes, width, in_channels, patch, pool, image_size, impl)


@MODELS.register
def vit_small(num_classes=10, width=1.0, in_channels=3, patch=8, pool: Pool = "cls",
              image_size=32, impl: Impl = "dinopl") -> Classifier:
    return _vit("vit_small", num_classes, width, in_channels, patch, pool, image_size, impl)


@MODELS.register
def vit_base(num_classes=10, width=1.0, in_channels=3, patch=8, pool: Pool = "cls",
             image_size=32, impl: Impl = "dinopl") -> Classifier:
    return _vit("vit_base", num_classes, width, in_channels, patch, pool, image_size, impl)

