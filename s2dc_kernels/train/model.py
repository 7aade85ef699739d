"""The S2DC student and teacher: a 3D encoder on crops, token (geo) and global projection heads, EMA teacher.

The encoder maps each crop (1, c, c, d) to a grid of tokens (dim, c/s, c/s, d/s), s = token_stride. The tokens
of a region's crops are re-assembled into the region's token grid and split into z-layers, the matching
problems of the losses (docs/method.md, section 1; token order of ``Geometry``).
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from s2dc_kernels._utils import check_choice

from .data import Geometry

BACKBONES = ("small", "monai-swin")


class Encoder3d(nn.Module):
    """3D encoder: crops (n, 1, c, c, d) -> tokens (n, dim, c/s, c/s, d/s), s = token_stride.

    "small" (default, pure PyTorch): a stride-1 Conv3d stem, then one stride-2 Conv3d stage per factor 2 of s
    (and one stride-r stage for an odd remainder r), each Conv3d + GroupNorm + GELU; widths double up to dim.
    "monai-swin": MONAI's SwinTransformer v2 as in the official code (feature size 48, depths 2-2-2-2, heads
    3-6-12-24, window 7); the tokens are its stage of stride s (s in 2, 4, ..., 32; the official 32 is the
    last stage), with 48 * s / 2 channels (768 at s = 32). ``self.dim`` is the tokens' channel count.
    """

    def __init__(self, token_stride: int, dim: int = 64, backbone: str = "small", in_channels: int = 1):
        super().__init__()
        self.backbone = check_choice("backbone", backbone, BACKBONES)
        self.token_stride = token_stride
        if backbone == "monai-swin":
            self.swin_stage, self.swin, self.dim = _monai_swin(token_stride, in_channels)
            return
        strides = _stride_factors(token_stride)
        widths = [max(dim >> (len(strides) - i), 8) for i in range(len(strides))] + [dim]  # stem, stages
        layers = _conv_block(in_channels, widths[0], kernel=3, stride=1, padding=1)
        for stride, w_in, w_out in zip(strides, widths[:-1], widths[1:], strict=True):
            kernel, padding = (3, 1) if stride == 2 else (stride, 0)
            layers += _conv_block(w_in, w_out, kernel=kernel, stride=stride, padding=padding)
        self.layers = nn.Sequential(*layers)
        self.dim = dim

    def forward(self, crops: Tensor) -> Tensor:
        """crops (n, 1, c, c, d) -> tokens (n, dim, c/s, c/s, d/s)."""
        if self.backbone == "monai-swin":
            return self.swin(crops)[self.swin_stage]
        return self.layers(crops)


def _stride_factors(stride: int) -> list[int]:
    """Stage strides of the small encoder: 2 per factor 2 of stride, then the odd remainder if > 1."""
    twos = (stride & -stride).bit_length() - 1
    remainder = stride >> twos
    return [2] * twos + ([remainder] if remainder > 1 else [])


def _conv_block(w_in: int, w_out: int, *, kernel: int, stride: int, padding: int) -> list[nn.Module]:
    """Conv3d + GroupNorm (groups = gcd(8, width)) + GELU."""
    return [
        nn.Conv3d(w_in, w_out, kernel, stride=stride, padding=padding),
        nn.GroupNorm(math.gcd(8, w_out), w_out),
        nn.GELU(),
    ]


def _monai_swin(token_stride: int, in_channels: int) -> tuple[int, nn.Module, int]:
    """(stage index, MONAI SwinTransformer v2 with the official settings, channels of that stage)."""
    try:
        from monai.networks.nets.swin_unetr import SwinTransformer
    except ImportError as error:
        raise ImportError(
            "backbone='monai-swin' needs MONAI, which is not installed (pip install monai einops); "
            "the default backbone 'small' needs nothing else"
        ) from error
    stage = token_stride.bit_length() - 2  # hidden states of strides 2, 4, 8, 16, 32
    if token_stride not in (2, 4, 8, 16, 32):
        raise ValueError(f"backbone='monai-swin' needs token_stride in (2, 4, 8, 16, 32), got {token_stride}")
    feature_size = 48
    swin = SwinTransformer(
        in_chans=in_channels,
        embed_dim=feature_size,
        window_size=(7, 7, 7),
        patch_size=(2, 2, 2),
        depths=(2, 2, 2, 2),
        num_heads=(3, 6, 12, 24),
        mlp_ratio=4.0,
        qkv_bias=True,
        norm_layer=nn.LayerNorm,
        spatial_dims=3,
        use_v2=True,
    )
    return stage, swin, feature_size << stage


class BatchNormNoAffine(nn.Module):
    """BatchNorm1d(affine=False, track_running_stats=False) on (..., H) rows: (x - mean) / sqrt(var + 1e-5),
    biased statistics over ``dims``. dims=None: every dim but the last (per feature, the usual batch norm);
    the official geo head's quirk is dims=(-2, -1) on (B, Z, N, H): per volume and z-layer over tokens and
    features (its BatchNorm1d(2048) sees (144, 3, 2048) and takes the 3 z-layers for channels)."""

    def __init__(self, dims: tuple[int, ...] | None = None):
        super().__init__()
        self.dims = dims

    def forward(self, x: Tensor) -> Tensor:
        dims = self.dims if self.dims is not None else tuple(range(x.dim() - 1))
        var, mean = torch.var_mean(x, dim=dims, correction=0, keepdim=True)
        return (x - mean) * torch.rsqrt(var + 1e-5)


def projection_head(in_dim: int, hidden: int, out_dim: int, norm_dims: tuple[int, ...] | None = None):
    """The official projection MLP, (..., in) -> (..., out): (Linear, batch norm, ReLU) x 2, Linear."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden),
        BatchNormNoAffine(norm_dims),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        BatchNormNoAffine(norm_dims),
        nn.ReLU(),
        nn.Linear(hidden, out_dim),
    )


class S2DCModel(nn.Module):
    """Encoder + geo head (token embeddings) + global head (pooled crop embeddings).

    Official sizes: Swin tokens 768 -> 2048 -> 2048 -> 512; CPU defaults: dim 64 -> hidden 128 -> 128 ->
    proj 64. bn_quirk=True reproduces the official geo head's batch norm over (tokens, features) per
    z-layer (docs/method.md, section 7); False (default) normalises per feature over all tokens of the batch.
    The global head normalises per feature over the batch's crops (as the official one).
    """

    def __init__(
        self,
        geometry: Geometry,
        backbone: str = "small",
        dim: int = 64,
        hidden: int = 128,
        proj: int = 64,
        bn_quirk: bool = False,
    ):
        super().__init__()
        self.geometry = geometry
        self.encoder = Encoder3d(geometry.token_stride, dim, backbone)
        self.proj = proj
        self.geo_head = projection_head(self.encoder.dim, hidden, proj, (-2, -1) if bn_quirk else None)
        self.global_head = projection_head(self.encoder.dim, hidden, proj)

    def forward(self, crops: Tensor) -> tuple[Tensor, Tensor]:
        """crops (B, n_crops, 1, c, c, d) -> (tokens (B, Z, N, proj), unit rows; pooled (B, n_crops, proj)).

        Token n of a z-layer is n = X * (gy * t) + Y, X = crop_x * t + x, Y = crop_y * t + y (crops row-major
        over (crop_x, crop_y)).
        """
        geo = self.geometry
        expected = (geo.n_crops, 1, geo.crop, geo.crop, geo.depth)
        if crops.dim() != 6 or tuple(crops.shape[1:]) != expected:
            raise ValueError(f"crops must be (B, *{expected}) for {geo}, got {tuple(crops.shape)}")
        B = crops.shape[0]
        features = self.encoder(crops.flatten(0, 1))  # (B * n_crops, D, t, t, z)
        D, t, _, z_layers = features.shape[1:]
        pooled = self.global_head(features.mean((2, 3, 4))).view(B, geo.n_crops, -1)
        gx, gy = geo.grid
        # (B, gx, gy, D, x, y, z) -> (B, z, gx, x, gy, y, D): row-major (X, Y) tokens per z-layer
        grid = features.view(B, gx, gy, D, t, t, z_layers).permute(0, 6, 1, 4, 2, 5, 3)
        tokens = grid.reshape(B, z_layers, gx * t * gy * t, D)
        return F.normalize(self.geo_head(tokens), dim=-1), pooled


class EMATeacher(nn.Module):
    """The teacher: a frozen deep copy of the student, updated as t <- momentum * t + (1 - momentum) * s."""

    def __init__(self, model: nn.Module, momentum: float = 0.999):
        super().__init__()
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {momentum}")
        self.module = copy.deepcopy(model).requires_grad_(False)
        self.momentum = float(momentum)

    @torch.no_grad()
    def update(self, student: nn.Module) -> None:
        """One EMA step of the parameters towards the student's; buffers are copied."""
        for teacher_param, student_param in zip(self.module.parameters(), student.parameters(), strict=True):
            teacher_param.mul_(self.momentum).add_(student_param.detach(), alpha=1 - self.momentum)
        for teacher_buffer, student_buffer in zip(self.module.buffers(), student.buffers(), strict=True):
            teacher_buffer.copy_(student_buffer)

    @torch.no_grad()
    def forward(self, crops: Tensor) -> tuple[Tensor, Tensor]:
        """The teacher's (tokens, pooled) of crops, without gradient (see ``S2DCModel.forward``)."""
        return self.module(crops)
