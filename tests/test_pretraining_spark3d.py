"""SparK-3D pre-training: stage masks on the block grid, the sparse encoder against an independent reference
(every convolution re-masked, visible-only instance norms), hidden zeros after every layer, nnssl's
densification, the masked loss, training with the configured optimiser, the plain U-Net checkpoint, resume."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from corpus_fixtures import write_phantom_corpus
from pretrain_det3d.models.backbone import build_resenc_unet
from pretrain_det3d.pretraining import METHODS
from pretrain_det3d.pretraining.masking import block_mask
from pretrain_det3d.pretraining.spark3d import SparkNetwork, cumulative_strides, downsample_mask, stage_masks
from pretrain_det3d.training.dataloader import load_case_records

PATCH = (32, 32, 32)
BLOCK = 8  # the demo preset's deepest stage has stride 8: every stage is aligned with the blocks
DEMO_STRIDES = [1, 2, 2, 2]


def _network(preset: str = "resenc_demo", seed: int = 0) -> SparkNetwork:
    torch.manual_seed(seed)
    net = SparkNetwork(build_resenc_unet(preset, 1, 1))
    with torch.no_grad():  # non-trivial affine parameters, so the reference checks that they are applied
        for module in net.encoder.modules():
            if isinstance(module, nn.InstanceNorm3d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
    return net


def _mask(batch: int = 2, seed: int = 0, patch=PATCH, block: int = BLOCK) -> torch.Tensor:
    return block_mask(batch, patch, block, 0.75, torch.Generator().manual_seed(seed))


def _images(batch: int = 2, patch=PATCH, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 1, *patch, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------------------------
# An independent reference of SparK's sparse encoder, written from the layers' definitions: each convolution is
# F.conv3d on the masked features followed by re-masking; each instance norm gathers the visible positions of a
# sample and normalises them with their own mean and (biased) variance.


def _visible_at(hidden: torch.Tensor, size) -> torch.Tensor:
    """Visible mask [B, 1, z, y, x] (bool) of a feature map of spatial ``size``: a position is visible when any
    input voxel it covers is visible (cells cut out by reshaping, not by pooling)."""
    batch, _, depth, height, width = hidden.shape
    z, y, x = (int(s) for s in size)
    cells = (~hidden).reshape(batch, 1, z, depth // z, y, height // y, x, width // x)
    return cells.any(dim=7).any(dim=5).any(dim=3)


def _reference_norm(features: torch.Tensor, visible: torch.Tensor, eps: float, weight=None, bias=None):
    out = torch.zeros_like(features)
    for sample in range(features.shape[0]):
        keep = visible[sample, 0]  # [z, y, x]
        values = features[sample][:, keep]  # [C, n]
        mean = values.mean(dim=1, keepdim=True)
        variance = values.var(dim=1, unbiased=False, keepdim=True)
        normed = (values - mean) / torch.sqrt(variance + eps)
        if weight is not None:
            normed = normed * weight[:, None] + bias[:, None]
        out[sample][:, keep] = normed
    return out


def _reference_conv(features: torch.Tensor, conv: nn.Conv3d, hidden: torch.Tensor) -> torch.Tensor:
    out = F.conv3d(features, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)
    return out * _visible_at(hidden, out.shape[2:])


def _reference_conv_block(features: torch.Tensor, block: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """dynamic_network_architectures' ConvDropoutNormReLU: conv, norm, optional LeakyReLU."""
    out = _reference_conv(features, block.conv, hidden)
    out = _reference_norm(out, _visible_at(hidden, out.shape[2:]), block.norm.eps, block.norm.weight,
                          block.norm.bias)
    nonlin = getattr(block, "nonlin", None)
    return out if nonlin is None else F.leaky_relu(out, nonlin.negative_slope)


def _reference_residual_block(features: torch.Tensor, block: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """BasicBlockD: conv1 -> conv2, plus the skip (average pool and/or 1x1 projection), then LeakyReLU."""
    out = _reference_conv_block(_reference_conv_block(features, block.conv1, hidden), block.conv2, hidden)
    residual = features
    if isinstance(block.skip, nn.Sequential):
        for op in block.skip:
            if isinstance(op, nn.AvgPool3d):
                residual = F.avg_pool3d(residual, op.kernel_size, op.stride)
                residual = residual * _visible_at(hidden, residual.shape[2:])
            else:
                residual = _reference_conv_block(residual, op, hidden)
    return F.leaky_relu(out + residual, block.nonlin2.negative_slope)


def _reference_encoder(encoder: nn.Module, images: torch.Tensor, hidden: torch.Tensor) -> list[torch.Tensor]:
    features = images * _visible_at(hidden, images.shape[2:])
    for block in encoder.stem.convs:
        features = _reference_conv_block(features, block, hidden)
    outputs = []
    for stage in encoder.stages:
        for block in stage.blocks:
            features = _reference_residual_block(features, block, hidden)
        outputs.append(features)
    return outputs


# resenc_demo at 32^3 with 8^3 blocks: every stage finer than or as fine as the blocks; resenc_small at 16^3
# with 4^3 blocks: its deepest stage (stride 8) is coarser than the blocks (min-pool); resenc_l at 32^3 with
# 16^3 blocks: all six stages, two finer than the blocks, one equal, three coarser (float64 ResEnc-L: about
# 30 s on one core, hence marked slow)
REFERENCE_CASES = [
    ("resenc_demo", PATCH, BLOCK),
    ("resenc_small", (16, 16, 16), 4),
    pytest.param("resenc_l", (32, 32, 32), 16, marks=pytest.mark.slow),
]


@pytest.mark.parametrize("preset,patch,block", REFERENCE_CASES)
def test_sparse_encoder_matches_the_independent_reference(preset, patch, block):
    net = _network(preset).double()  # float64 on both sides: the comparison is about semantics, not rounding
    mask = _mask(patch=patch, block=block)
    images = _images(patch=patch).double()
    with torch.no_grad():
        skips, masks = net.encode(images, mask)
        reference = _reference_encoder(net.encoder, images, mask)
    assert len(skips) == len(reference) == len(net.encoder.stages)
    for skip, expected, stage_mask in zip(skips, reference, masks):
        assert torch.equal(stage_mask, ~_visible_at(mask, skip.shape[2:]))
        visible = (~stage_mask).expand_as(skip)
        assert int(visible.sum()) > 0
        torch.testing.assert_close(skip[visible], expected[visible], atol=1e-5, rtol=1e-5)
        assert torch.count_nonzero(skip[~visible]) == 0


def test_masking_once_per_stage_is_not_the_reference():
    # the control of the test above (it can fail): the former emulation, a dense stage re-masked at its end,
    # lets hidden zeros into the norm statistics and spreads content into hidden blocks within a stage
    net = _network()
    plain = build_resenc_unet("resenc_demo", 1, 1)
    plain.load_state_dict(net.unet_state_dict(), strict=True)  # the same weights, dense layers
    mask, images = _mask(), _images()
    with torch.no_grad():
        reference = _reference_encoder(net.encoder, images, mask)
        features = plain.encoder.stem(images.masked_fill(mask, 0.0)).masked_fill(mask, 0.0)
        for stage, expected in zip(plain.encoder.stages, reference):
            features = stage(features)
            features = features * _visible_at(mask, features.shape[2:])
            visible = _visible_at(mask, expected.shape[2:]).expand_as(expected)
            relative = (features - expected)[visible].norm() / expected[visible].norm()
            assert relative > 0.05


def _hidden_nonzero_per_layer(net: SparkNetwork, images: torch.Tensor, mask: torch.Tensor, sparse: bool):
    """Run the encoder with a hook on every layer (conv, norm, pooling, nonlinearity) that counts non-zero
    values at hidden positions of the layer's output right when it is produced (LeakyReLU works in place)."""
    counts: dict[str, int] = {}

    def hook(name):
        def count(module, inputs, output):
            hidden = ~_visible_at(mask, output.shape[2:])
            counts[name] = counts.get(name, 0) + int(torch.count_nonzero(output[hidden.expand_as(output)]))
        return count

    layers = (nn.Conv3d, nn.InstanceNorm3d, nn.AvgPool3d, nn.LeakyReLU)
    handles = [module.register_forward_hook(hook(name)) for name, module in net.encoder.named_modules()
               if isinstance(module, layers)]
    try:
        with torch.no_grad():
            if sparse:
                net.encode(images, mask)
            else:
                net.encoder(images.masked_fill(mask, 0.0))  # the same encoder, no mask set: dense layers
    finally:
        for handle in handles:
            handle.remove()
    return counts


@pytest.mark.parametrize("preset", ["resenc_demo", "resenc_small"])
def test_hidden_positions_are_zero_after_every_layer(preset):
    net = _network(preset)
    mask, images = _mask(), _images()
    counts = _hidden_nonzero_per_layer(net, images, mask, sparse=True)
    modules = dict(net.encoder.named_modules())
    hooked = {name for name, module in modules.items() if isinstance(module, (nn.Conv3d, nn.InstanceNorm3d))}
    assert hooked <= set(counts)  # every conv and norm ran
    assert any(isinstance(modules[name], nn.AvgPool3d) for name in counts)  # the skip path is covered
    assert any(".skip." in name for name in counts) and any(name.startswith("stem.") for name in counts)
    assert {name: n for name, n in counts.items() if n} == {}
    # control: the same hooks on the dense encoder find content at hidden positions in most layers
    dense = _hidden_nonzero_per_layer(net, images, mask, sparse=False)
    assert sum(n > 0 for n in dense.values()) > 0.5 * len(dense)


def test_hidden_input_cannot_leak_into_the_encoder_output():
    net = _network()
    mask = _mask()
    images = _images()
    with torch.no_grad():
        skips, _ = net.encode(images, mask)
        changed = images.clone()
        changed[mask] = 100.0  # any content in the hidden blocks
        skips_changed, _ = net.encode(changed, mask)
    for skip, again in zip(skips, skips_changed):
        assert torch.equal(skip, again)  # the encoder output does not depend on hidden voxels at all


def test_outside_a_forward_the_encoder_is_the_plain_dense_encoder():
    net = _network()
    plain = build_resenc_unet("resenc_demo", 1, 1)
    plain.load_state_dict(net.unet_state_dict(), strict=True)
    images = _images()
    with torch.no_grad():
        for ours, theirs in zip(net.encoder(images), plain.encoder(images)):
            torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    assert set(net.unet_state_dict()) == set(plain.state_dict())


def test_densify_is_norm_then_mask_token_then_projection():
    net = _network()
    mask = _mask()
    with torch.no_grad():
        for token in net.mask_tokens:
            token.normal_()
        skips, masks = net.encode(_images(), mask)
        dense = net.densify(skips, masks)
    assert isinstance(net.densify_projs[0], nn.Identity)  # nnssl: the shallowest skip is not projected
    for stage, (skip, stage_mask, out) in enumerate(zip(skips, masks, dense)):
        hidden = stage_mask.expand_as(skip)
        normed = _reference_norm(skip, ~stage_mask, eps=1e-5)  # no affine parameters (nnssl's default)
        filled = torch.where(hidden, net.mask_tokens[stage].expand_as(skip), normed)
        if stage == 0:
            expected = filled
        else:
            projection = net.densify_projs[stage]
            assert projection.kernel_size == (3, 3, 3) and projection.bias is not None
            expected = F.conv3d(filled, projection.weight, projection.bias, padding=1)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_every_mask_token_and_projection_receives_gradients():
    net = _network()
    mask = block_mask(1, (16, 16, 16), BLOCK, 0.75, torch.Generator().manual_seed(0))  # 6 of 8 blocks hidden
    images = torch.randn(1, 1, 16, 16, 16)
    out = net(images, mask)
    ((out - images) ** 2)[mask.expand_as(out)].mean().backward()
    assert len(net.mask_tokens) == 4
    for token in net.mask_tokens:
        assert token.grad is not None and token.grad.abs().sum() > 0
    for projection in list(net.densify_projs)[1:]:
        assert projection.weight.grad is not None and projection.weight.grad.abs().sum() > 0


def test_mask_tokens_are_truncated_at_one_std():
    # nnssl / SparK: trunc_normal_(std=.02, a=-.02, b=.02); a cut at +-2 std would put about 28 % of the
    # 120 values of resenc_demo beyond 0.02
    torch.manual_seed(0)
    net = SparkNetwork(build_resenc_unet("resenc_demo", 1, 1), mask_token_std=0.02)
    values = torch.cat([token.detach().ravel() for token in net.mask_tokens])
    assert values.numel() == 8 + 16 + 32 + 64
    assert values.abs().max() <= 0.02 and values.std() > 0.008  # the std of N(0, 1) cut at +-1 is 0.54


def test_stage_masks_follow_the_block_grid():
    mask = _mask(batch=3)
    flags = mask.reshape(3, 1, 4, BLOCK, 4, BLOCK, 4, BLOCK).amax(dim=(3, 5, 7))  # [B, 1, 4, 4, 4] block flags
    assert flags.flatten(1).sum(1).tolist() == [48] * 3  # 75 % of 64 blocks
    masks = stage_masks(mask, DEMO_STRIDES)
    assert cumulative_strides(DEMO_STRIDES) == [(1, 1, 1), (2, 2, 2), (4, 4, 4), (8, 8, 8)]
    for stage_mask, stride in zip(masks, (1, 2, 4, 8)):
        cells = BLOCK // stride  # stage voxels per block edge
        assert stage_mask.shape == (3, 1, 32 // stride, 32 // stride, 32 // stride)
        expected = flags
        for axis in (2, 3, 4):
            expected = expected.repeat_interleave(cells, dim=axis)
        assert torch.equal(stage_mask, expected)
        assert stage_mask[0].float().mean().item() == 0.75


def test_a_coarse_position_is_hidden_only_when_all_it_covers_is_hidden():
    # hand-worked: 2 x 2 x 2 blocks of 4 voxels seen by one position of stride 8
    blocks = torch.ones(2, 1, 2, 2, 2, dtype=torch.bool)
    blocks[0, 0, 1, 0, 1] = False  # sample 0: 7 of 8 blocks hidden; sample 1: all hidden
    mask = blocks.repeat_interleave(4, 2).repeat_interleave(4, 3).repeat_interleave(4, 4)
    assert downsample_mask(mask, (8, 8, 8)).ravel().tolist() == [False, True]
    # brute force on a random voxel mask
    random_mask = torch.rand(1, 1, 8, 8, 8, generator=torch.Generator().manual_seed(3)) < 0.9
    pooled = downsample_mask(random_mask, (2, 4, 2))
    for z, y, x in np.ndindex(*pooled.shape[2:]):
        cell = random_mask[0, 0, 2 * z : 2 * z + 2, 4 * y : 4 * y + 4, 2 * x : 2 * x + 2]
        assert bool(pooled[0, 0, z, y, x]) == bool(cell.all())
    with pytest.raises(ValueError, match="stride"):
        downsample_mask(random_mask, (3, 1, 1))


def _trainer(tmp_path: Path, num_cases: int = 1, **overrides):
    write_phantom_corpus(tmp_path / "corpus", num_cases=num_cases)
    records = load_case_records(tmp_path / "corpus", [f"vol_{i:03d}" for i in range(num_cases)], with_labels=False)
    settings = {"preset": "resenc_demo", "patch_size": list(PATCH), "mask_block": BLOCK, "iterations": 2,
                "batch_size": 2, "progress_bar": False, **overrides}
    torch.manual_seed(0)  # the network's initial weights, independent of the tests run before
    return METHODS.get("spark3d")(settings, records, in_channels=1, out_path=tmp_path / "out.pth", seed=0)


class _FixedOutput(torch.nn.Module):
    """Stands in for the network: returns a learnable tensor, records the mask it was given."""

    def __init__(self, shape) -> None:
        super().__init__()
        self.output = torch.nn.Parameter(torch.randn(shape, generator=torch.Generator().manual_seed(5)))
        self.mask: torch.Tensor | None = None

    def forward(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        self.mask = mask
        return self.output


def test_loss_counts_hidden_voxels_only(tmp_path):
    trainer = _trainer(tmp_path)
    images = torch.randn(2, 1, *PATCH)
    trainer.model = _FixedOutput(images.shape)
    loss = trainer.compute_losses({"images": images})["loss"]
    mask = trainer.make_mask(2)  # same iteration -> same mask
    assert torch.equal(trainer.model.mask, mask)
    expected = ((trainer.model.output - images)[mask] ** 2).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    grad = trainer.model.output.grad
    assert torch.count_nonzero(grad[~mask]) == 0  # visible voxels do not enter the loss
    assert torch.count_nonzero(grad[mask]) == int(mask.sum())
    trainer.iteration = 1
    assert not torch.equal(trainer.make_mask(2), mask)  # a new mask every iteration


def test_bad_mask_block_or_patch_names_the_key(tmp_path):
    with pytest.raises(ValueError, match="mask_block"):
        _trainer(tmp_path / "a", mask_block=12)
    with pytest.raises(ValueError, match="patch_size"):
        _trainer(tmp_path / "b", patch_size=[36, 36, 36], mask_block=4)  # 36 is not a multiple of stride 8


def _fixed_patches(corpus: Path, patch: int) -> torch.Tensor:
    """Held-out evaluation patches [N, 1, p, p, p]: three fixed crops of every corpus volume."""
    crops = []
    for path in sorted((corpus / "cases").glob("vol_???.npy")):
        volume = np.load(path)
        volume = volume[0] if volume.ndim == 4 else volume
        for z, y, x in [(4, 4, 4), (12, 12, 12), (16, 8, 12)]:
            crops.append(volume[z : z + patch, y : y + patch, x : x + patch])
    return torch.from_numpy(np.stack(crops)[:, None].astype(np.float32))


def test_spark_loss_falls_with_the_configured_sgd_and_checkpoint_is_a_plain_unet(tmp_path):
    from pretrain_det3d.models.checkpoint import load_pretrained_encoder
    from pretrain_det3d.pretraining.masking import masked_mse

    # the method's own optimiser settings (nnssl's SGD, Nesterov momentum 0.99, lr 1e-2, weight decay 3e-5, no
    # warm-up): none of optimizer / lr / momentum / weight_decay / warmup_iterations is overridden here
    patch = (16, 16, 16)
    trainer = _trainer(tmp_path, num_cases=3, patch_size=list(patch), batch_size=4, iterations=30,
                       checkpoint_every=15, threads=1, augmentation=False)
    assert isinstance(trainer.optimizer, torch.optim.SGD)
    group = trainer.optimizer.param_groups[0]
    assert group["nesterov"] and group["momentum"] == 0.99 and group["weight_decay"] == 3e-5
    assert trainer.settings.lr == 0.01 and trainer.settings.warmup_iterations == 0
    densifier = {id(p) for p in list(trainer.model.mask_tokens) + list(trainer.model.densify_projs.parameters())}
    optimised = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert densifier <= optimised  # the pre-training head is trained too
    # the loss on fixed held-out patches and masks (30 noisy training batches of 16^3 say little on their own)
    patches = _fixed_patches(tmp_path / "corpus", patch[0])
    masks = block_mask(len(patches), patch, BLOCK, 0.75, torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = masked_mse(trainer.model(patches, masks), patches, masks).item()
    trainer.run()
    with torch.no_grad():
        after = masked_mse(trainer.model(patches, masks), patches, masks).item()
    assert after < 0.8 * before
    with open(tmp_path / "log.csv", newline="") as handle:
        losses = [float(row["loss"]) for row in csv.DictReader(handle)]
    assert len(losses) == 30 and all(np.isfinite(losses))
    out = tmp_path / "out.pth"
    record = torch.load(out, weights_only=True)
    assert record["nnssl_adaptation_plan"]["pretrain_method"] == "spark3d"
    weights = record["network_weights"]
    assert not any(key.startswith(("mask_tokens", "densify")) for key in weights)
    build_resenc_unet("resenc_demo", 1, 1).load_state_dict(weights, strict=True)  # exactly a U-Net's keys
    report = load_pretrained_encoder(build_resenc_unet("resenc_demo", 1, 1), out)
    assert len(report.loaded_keys) > 10


def test_paused_spark_resumes_exactly(tmp_path):
    write_phantom_corpus(tmp_path / "corpus", num_cases=1)
    records = load_case_records(tmp_path / "corpus", ["vol_000"], with_labels=False)
    settings = {"preset": "resenc_demo", "patch_size": [16, 16, 16], "mask_block": 8, "iterations": 4,
                "batch_size": 1, "progress_bar": False}

    def trainer(out: Path, init_seed: int):
        torch.manual_seed(init_seed)
        return METHODS.get("spark3d")(settings, records, in_channels=1, out_path=out, seed=0)

    trainer(tmp_path / "a" / "final.pth", 0).run()
    trainer(tmp_path / "b" / "final.pth", 0).run(stop_at=2)
    trainer(tmp_path / "b" / "final.pth", 7).run()  # other initial weights, replaced on resume
    a = torch.load(tmp_path / "a" / "final.pth", weights_only=True)["network_weights"]
    b = torch.load(tmp_path / "b" / "final.pth", weights_only=True)["network_weights"]
    assert all(torch.equal(a[key], b[key]) for key in a)
