"""Tests for models.deformable_attention against a naive float64 reference with explicit loops."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from pretrain_det3d.models.deformable_attention import (
    MultiScaleDeformableAttention3D,
    head_directions,
    level_start_indices,
    multi_scale_deformable_attention,
)


def _trilinear_reference(volume: torch.Tensor, location: tuple[float, float, float]) -> torch.Tensor:
    """Trilinear interpolation of ``volume [D, Z, Y, X]`` at a normalised (z, y, x) point, zeros outside.

    Voxel ``i`` of an axis of size ``n`` has its centre at ``(i + 0.5) / n`` (grid_sample's align_corners=False).
    """
    channels, *shape = volume.shape
    continuous = [loc * n - 0.5 for loc, n in zip(location, shape)]
    base = [math.floor(c) for c in continuous]
    frac = [c - b for c, b in zip(continuous, base)]
    result = torch.zeros(channels, dtype=torch.float64)
    for corner in itertools.product((0, 1), repeat=3):
        index = [b + c for b, c in zip(base, corner)]
        if any(i < 0 or i >= n for i, n in zip(index, shape)):
            continue  # zero padding
        weight = 1.0
        for f, c in zip(frac, corner):
            weight *= f if c else 1.0 - f
        result += weight * volume[:, index[0], index[1], index[2]]
    return result


def _naive_attention(value, spatial_shapes, locations, weights) -> torch.Tensor:
    """Loops over batch, queries, heads, levels and points (float64)."""
    batch, _, heads, head_dim = value.shape
    queries, levels, points = locations.shape[1], locations.shape[3], locations.shape[4]
    starts = level_start_indices(spatial_shapes)
    out = torch.zeros(batch, queries, heads * head_dim, dtype=torch.float64)
    for b, q, h in itertools.product(range(batch), range(queries), range(heads)):
        acc = torch.zeros(head_dim, dtype=torch.float64)
        for level in range(levels):
            z, y, x = spatial_shapes[level].tolist()
            tokens = value[b, starts[level] : starts[level] + z * y * x, h]  # [N_l, D], z-major
            volume = tokens.T.reshape(head_dim, z, y, x)
            for p in range(points):
                loc = tuple(locations[b, q, h, level, p].tolist())
                acc += weights[b, q, h, level, p] * _trilinear_reference(volume, loc)
        out[b, q, h * head_dim : (h + 1) * head_dim] = acc
    return out


def _random_case(seed: int, batch=2, queries=3, heads=2, head_dim=3, points=2):
    g = torch.Generator().manual_seed(seed)
    shapes = torch.tensor([[3, 4, 5], [2, 2, 3], [1, 2, 1]])
    tokens = int(shapes.prod(dim=1).sum())
    value = torch.randn(batch, tokens, heads, head_dim, generator=g, dtype=torch.float64)
    # From -0.4 to 1.4: a good share of the points fall partly or wholly outside the volume.
    locations = torch.rand(batch, queries, heads, len(shapes), points, 3, generator=g, dtype=torch.float64) * 1.8 - 0.4
    weights = torch.rand(batch, queries, heads, len(shapes), points, generator=g, dtype=torch.float64)
    return value, shapes, locations, weights


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_naive_reference_including_points_outside(seed: int) -> None:
    value, shapes, locations, weights = _random_case(seed)
    outside = ((locations < 0) | (locations > 1)).any(dim=-1)
    assert outside.any() and (~outside).any()  # the case exercises both
    fast = multi_scale_deformable_attention(value, shapes, locations, weights)
    naive = _naive_attention(value, shapes, locations, weights)
    assert fast.dtype == torch.float64
    torch.testing.assert_close(fast, naive, atol=1e-6, rtol=0)


def test_hand_worked_values() -> None:
    # One level 1x2x2 (z, y, x), one head, one channel: values 0 1 / 2 3 (y rows, x columns).
    value = torch.tensor([0.0, 1.0, 2.0, 3.0], dtype=torch.float64).view(1, 4, 1, 1)
    shapes = torch.tensor([[1, 2, 2]])
    points = torch.tensor(
        [
            [0.5, 0.25, 0.25],  # centre of voxel (0, 0) -> 0
            [0.5, 0.75, 0.75],  # centre of voxel (1, 1) -> 3
            [0.5, 0.5, 0.5],  # middle of all four -> 1.5
            [0.5, 0.25, 1.0],  # half-way from voxel (0, 1) into the zero padding -> 0.5
            [0.5, 2.0, 2.0],  # far outside -> 0
        ],
        dtype=torch.float64,
    )
    locations = points.view(1, 5, 1, 1, 1, 3)
    out = multi_scale_deformable_attention(value, shapes, locations, torch.ones(1, 5, 1, 1, 1, dtype=torch.float64))
    torch.testing.assert_close(out.view(-1), torch.tensor([0.0, 3.0, 1.5, 0.5, 0.0], dtype=torch.float64))


def test_shape_errors_are_clear() -> None:
    value, shapes, locations, weights = _random_case(0)
    with pytest.raises(ValueError, match="tokens"):
        multi_scale_deformable_attention(value[:, 1:], shapes, locations, weights)
    with pytest.raises(ValueError, match="levels"):
        multi_scale_deformable_attention(value, shapes, locations[:, :, :, :2], weights[:, :, :, :2])


def _module_inputs(seed: int, ref_dim: int):
    g = torch.Generator().manual_seed(seed)
    shapes = torch.tensor([[4, 4, 4], [2, 2, 2]])
    query = torch.randn(2, 5, 16, generator=g, dtype=torch.float64)
    value = torch.randn(2, 64 + 8, 16, generator=g, dtype=torch.float64)
    reference = torch.rand(2, 5, 2, ref_dim, generator=g, dtype=torch.float64)
    return query, value, reference, shapes


@pytest.mark.parametrize("ref_dim", [3, 6])
def test_module_composes_projections_offsets_and_core(ref_dim: int) -> None:
    torch.manual_seed(0)
    attn = MultiScaleDeformableAttention3D(embed_dim=16, num_heads=2, num_levels=2, num_points=3).double()
    with torch.no_grad():  # non-trivial offsets and weights
        attn.sampling_offsets.weight.normal_(std=0.5)
        attn.attention_weights.weight.normal_()
    query, value, reference, shapes = _module_inputs(1, ref_dim)
    out = attn(query, reference, value, shapes)

    offsets = attn.sampling_offsets(query).view(2, 5, 2, 2, 3, 3)
    weights = attn.attention_weights(query).view(2, 5, 2, 6).softmax(-1).view(2, 5, 2, 2, 3)
    expected_locations = torch.empty_like(offsets)
    for b, q, h, level, p in itertools.product(range(2), range(5), range(2), range(2), range(3)):
        ref = reference[b, q, level]
        if ref_dim == 3:  # offsets in voxels of the level
            expected_locations[b, q, h, level, p] = ref + offsets[b, q, h, level, p] / shapes[level].double()
        else:  # offsets in half box sizes / points
            expected_locations[b, q, h, level, p] = ref[:3] + offsets[b, q, h, level, p] / 3 * ref[3:] / 2
    projected = attn.value_proj(value).view(2, 72, 2, 8)
    expected = attn.output_proj(_naive_attention(projected, shapes, expected_locations, weights))
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)


def test_gradients_reach_offset_and_weight_projections() -> None:
    torch.manual_seed(0)
    attn = MultiScaleDeformableAttention3D(embed_dim=16, num_heads=2, num_levels=2, num_points=2)
    query, value, reference, shapes = (t.float() for t in _module_inputs(2, 3))
    attn(query, reference, value, shapes).square().sum().backward()
    for layer in (attn.sampling_offsets, attn.attention_weights, attn.value_proj, attn.output_proj):
        assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
        assert layer.bias.grad.abs().sum() > 0


def test_initial_sampling_pattern_is_a_star_of_rays() -> None:
    attn = MultiScaleDeformableAttention3D(embed_dim=16, num_heads=8, num_levels=2, num_points=3)
    offsets = attn.sampling_offsets(torch.randn(1, 1, 16)).view(8, 2, 3, 3)  # weights are zero: bias only
    corners = {tuple(v) for v in offsets[:, 0, 0].tolist()}
    assert corners == set(itertools.product((-1.0, 1.0), repeat=3))  # eight heads = eight cube corners
    torch.testing.assert_close(offsets[:, :, 2], 3 * offsets[:, :, 0])  # point p is p + 1 steps out
    torch.testing.assert_close(offsets[:, 0], offsets[:, 1])  # same on every level
    weights = attn.attention_weights(torch.randn(1, 1, 16))
    assert torch.all(weights == 0)  # uniform attention at the start


@pytest.mark.parametrize("heads", [1, 4, 6])
def test_head_directions_for_other_head_counts(heads: int) -> None:
    directions = head_directions(heads)
    assert directions.shape == (heads, 3)
    torch.testing.assert_close(directions.abs().amax(dim=1), torch.ones(heads))
    assert len({tuple(round(v, 6) for v in d) for d in directions.tolist()}) == heads


def test_rejects_bad_configuration() -> None:
    with pytest.raises(ValueError, match="divisible"):
        MultiScaleDeformableAttention3D(embed_dim=10, num_heads=4)
    attn = MultiScaleDeformableAttention3D(embed_dim=8, num_heads=2, num_levels=2, num_points=1)
    with pytest.raises(ValueError, match="end in 3"):
        attn(torch.zeros(1, 1, 8), torch.zeros(1, 1, 2, 4), torch.zeros(1, 72, 8), torch.tensor([[4, 4, 4], [2, 2, 2]]))
