"""Multi-scale deformable attention in 3D, in plain PyTorch (no compiled extension).

Deformable attention (Zhu et al., ICLR 2021) lets each query look at a few learnt points per head and feature
level instead of at every key: the query predicts ``num_points`` sampling offsets around its reference point
and one weight per sampled point; the output is the weighted sum of the (trilinearly interpolated) values at
those points. Cost and memory grow with ``queries x heads x levels x points``, never with ``queries x keys``.

Here the interpolation is :func:`torch.nn.functional.grid_sample` on 5-D tensors (trilinear, zero padding,
``align_corners=False``), so it runs wherever torch runs and autograd gives the gradients.

Coordinate convention: every location and offset is ordered like the array axes ``(z, y, x)``, normalised
to ``[0, 1]`` over the whole volume of a level (0 = the outer face of the first voxel, 1 = the outer face of
the last); ``grid_sample`` wants ``(x, y, z)`` in ``[-1, 1]``, and the flip happens only inside
:func:`multi_scale_deformable_attention`.

Example:
    >>> import torch
    >>> attn = MultiScaleDeformableAttention3D(embed_dim=16, num_heads=2, num_levels=2, num_points=2)
    >>> shapes = torch.tensor([[4, 4, 4], [2, 2, 2]])
    >>> value = torch.randn(1, 64 + 8, 16)
    >>> out = attn(torch.randn(1, 5, 16), torch.rand(1, 5, 2, 3), value, shapes)
    >>> tuple(out.shape)
    (1, 5, 16)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

DEFAULT_EMBED_DIM = 128
DEFAULT_NUM_HEADS = 8
DEFAULT_NUM_LEVELS = 4
DEFAULT_NUM_POINTS = 4


def level_start_indices(spatial_shapes: Tensor) -> list[int]:
    """Offsets of each level in the flattened token sequence.

    Example:
        >>> level_start_indices(torch.tensor([[4, 4, 4], [2, 2, 2]]))
        [0, 64]
    """
    sizes = [int(z * y * x) for z, y, x in spatial_shapes.tolist()]
    return [sum(sizes[:level]) for level in range(len(sizes))]


def multi_scale_deformable_attention(
    value: Tensor, spatial_shapes: Tensor, sampling_locations: Tensor, attention_weights: Tensor
) -> Tensor:
    """Weighted sum of trilinearly sampled values (the core of deformable attention, without projections).

    Args:
        value: ``[B, N, H, D]``, the tokens of all levels flattened level by level (each level z-major).
        spatial_shapes: ``[L, 3]`` integer ``(Z, Y, X)`` of each level; ``sum(Z*Y*X) == N``.
        sampling_locations: ``[B, Q, H, L, P, 3]`` normalised ``(z, y, x)``; points outside ``[0, 1]`` read
            zeros (the volume is zero-padded).
        attention_weights: ``[B, Q, H, L, P]`` (usually softmax-normalised over ``L * P``).

    Returns:
        ``[B, Q, H * D]``.

    Example:
        >>> v = torch.ones(1, 8, 1, 1)  # one level of 2^3 voxels, all ones
        >>> loc = torch.full((1, 1, 1, 1, 1, 3), 0.5)  # the centre of the volume
        >>> multi_scale_deformable_attention(v, torch.tensor([[2, 2, 2]]), loc, torch.ones(1, 1, 1, 1, 1))
        tensor([[[1.]]])
    """
    batch, num_tokens, heads, head_dim = value.shape
    _, queries, _, levels, points, _ = sampling_locations.shape
    sizes = [int(z * y * x) for z, y, x in spatial_shapes.tolist()]
    if sum(sizes) != num_tokens:
        raise ValueError(f"spatial_shapes {spatial_shapes.tolist()} give {sum(sizes)} tokens, value has {num_tokens}")
    if len(sizes) != levels:
        raise ValueError(f"sampling_locations has {levels} levels, spatial_shapes {len(sizes)}")

    # Sample in the wider of the two dtypes: under mixed precision the values may be half precision, but
    # locations rounded to half precision would move points by up to a voxel on large levels.
    dtype = torch.promote_types(value.dtype, sampling_locations.dtype)
    value = value.to(dtype)
    # grid_sample: (z, y, x) in [0, 1] -> (x, y, z) in [-1, 1].
    grids = (2.0 * sampling_locations.to(dtype) - 1.0).flip(-1)
    output = value.new_zeros(batch * heads, head_dim, queries)
    for level, value_level in enumerate(value.split(sizes, dim=1)):
        z, y, x = (int(s) for s in spatial_shapes[level])
        # [B, N_l, H, D] -> [B*H, D, Z, Y, X]
        volume = value_level.permute(0, 2, 3, 1).reshape(batch * heads, head_dim, z, y, x)
        # [B, Q, H, P, 3] -> [B*H, Q, P, 1, 3]: a (Q, P, 1) output "volume" per head.
        grid = grids[:, :, :, level].permute(0, 2, 1, 3, 4).reshape(batch * heads, queries, points, 1, 3)
        # Trilinear on 5-D input: [B*H, D, Q, P, 1].
        sampled = F.grid_sample(volume, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        # [B, Q, H, P] -> [B*H, 1, Q, P]
        weights = attention_weights[:, :, :, level].permute(0, 2, 1, 3).reshape(batch * heads, 1, queries, points)
        output = output + (sampled.squeeze(-1) * weights.to(sampled.dtype)).sum(dim=-1).to(dtype)  # [B*H, D, Q]
    # [B*H, D, Q] -> [B, Q, H*D]
    return output.view(batch, heads, head_dim, queries).permute(0, 3, 1, 2).reshape(batch, queries, heads * head_dim)


def head_directions(num_heads: int) -> Tensor:
    """One unit-max-norm ``(z, y, x)`` direction per head, spread over the sphere (initial sampling pattern).

    Eight heads get the eight cube corners; other counts get a Fibonacci lattice on the sphere. Each direction
    is scaled so that its largest component is 1, so point ``p`` starts ``p + 1`` voxels out along it.

    Example:
        >>> head_directions(8).abs().amax(dim=1)
        tensor([1., 1., 1., 1., 1., 1., 1., 1.])
    """
    if num_heads == 8:
        corners = torch.tensor([[sz, sy, sx] for sz in (-1.0, 1.0) for sy in (-1.0, 1.0) for sx in (-1.0, 1.0)])
        return corners
    index = torch.arange(num_heads, dtype=torch.float64) + 0.5
    polar = torch.acos(1.0 - 2.0 * index / num_heads)
    azimuth = math.pi * (1.0 + math.sqrt(5.0)) * index
    directions = torch.stack(
        [torch.cos(polar), torch.sin(polar) * torch.sin(azimuth), torch.sin(polar) * torch.cos(azimuth)], dim=1
    )
    return (directions / directions.abs().amax(dim=1, keepdim=True)).float()


class MultiScaleDeformableAttention3D(nn.Module):
    """Multi-head, multi-level deformable attention over 3D feature maps.

    Args:
        embed_dim: width of queries and values (divisible by ``num_heads``).
        num_heads: attention heads.
        num_levels: feature levels the values come from.
        num_points: sampling points per head and level.

    ``forward(query [B,Q,C], reference_points, value [B,N,C], spatial_shapes [L,3]) -> [B,Q,C]``;
    ``reference_points`` is ``[B, Q, L, 3]`` (normalised ``(z, y, x)`` points: offsets are in voxels of each
    level) or ``[B, Q, L, 6]`` (normalised centre-size boxes ``(cz, cy, cx, dz, dy, dx)``: offsets are in
    units of half the box size divided by ``num_points``, as in two-stage Deformable DETR).
    """

    def __init__(
        self,
        embed_dim: int = DEFAULT_EMBED_DIM,
        num_heads: int = DEFAULT_NUM_HEADS,
        num_levels: int = DEFAULT_NUM_LEVELS,
        num_points: int = DEFAULT_NUM_POINTS,
    ) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} must be divisible by num_heads {num_heads}")
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.num_levels, self.num_points = num_levels, num_points
        self.sampling_offsets = nn.Linear(embed_dim, num_heads * num_levels * num_points * 3)
        self.attention_weights = nn.Linear(embed_dim, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(embed_dim, embed_dim)
        self.output_proj = nn.Linear(embed_dim, embed_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Start every query with a fixed star of points (one ray per head) and uniform attention."""
        nn.init.zeros_(self.sampling_offsets.weight)
        rays = head_directions(self.num_heads)  # [H, 3]
        steps = torch.arange(1, self.num_points + 1, dtype=torch.float32)  # point p is p+1 steps out
        star = rays[:, None, None, :] * steps[None, None, :, None]  # [H, 1, P, 3]
        star = star.expand(self.num_heads, self.num_levels, self.num_points, 3)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(star.reshape(-1))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for layer in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, query: Tensor, reference_points: Tensor, value: Tensor, spatial_shapes: Tensor) -> Tensor:
        batch, queries, _ = query.shape
        heads, levels, points = self.num_heads, self.num_levels, self.num_points
        if spatial_shapes.shape[0] != levels:
            raise ValueError(f"attention built for {levels} levels, got {spatial_shapes.shape[0]}")
        projected = self.value_proj(value).view(batch, value.shape[1], heads, self.embed_dim // heads)
        offsets = self.sampling_offsets(query).view(batch, queries, heads, levels, points, 3)
        weights = self.attention_weights(query).view(batch, queries, heads, levels * points)
        weights = weights.softmax(dim=-1).view(batch, queries, heads, levels, points)
        if reference_points.shape[-1] == 3:
            # Offsets in voxels of each level: divide by the level's (Z, Y, X).
            scale = spatial_shapes.to(offsets.dtype)[None, None, None, :, None, :]  # [1,1,1,L,1,3]
            locations = reference_points[:, :, None, :, None, :] + offsets / scale
        elif reference_points.shape[-1] == 6:
            centres = reference_points[:, :, None, :, None, :3]
            half_sizes = reference_points[:, :, None, :, None, 3:] * 0.5
            locations = centres + offsets / points * half_sizes
        else:
            raise ValueError(
                f"reference_points must end in 3 (points) or 6 (boxes), got {tuple(reference_points.shape)}"
            )
        sampled = multi_scale_deformable_attention(projected, spatial_shapes, locations, weights)
        return self.output_proj(sampled)
