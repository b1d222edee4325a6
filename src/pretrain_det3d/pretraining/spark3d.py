"""SparK for 3D: sparse masked autoencoding of a ResEnc U-Net, emulated with dense convolutions
(the paper's "spark3d" pre-training; Tian et al., ICLR 2023, as ported to 3D by nnssl's ``SparkMAETrainer``).

A convolutional encoder that sees a masked patch spreads visible content into the hidden blocks (every 3^3
convolution reaches one voxel further) and lets the zeros of the hidden blocks into its instance-norm
statistics, so the pattern it learns on is not the one it is asked to fill in. SparK runs the encoder as a
sparse network: every layer computes only at visible positions, and the decoder gets dense inputs back by
filling the hidden positions with learnt mask tokens. Dense emulation here, layer by layer (as nnssl's
``spark_utils.py`` does it):

* the input block mask (``mask_block`` cubes, ``mask_ratio`` of them hidden, as for ``mae``) is brought to the
  resolution of every feature map the encoder computes (:func:`downsample_mask`);
* hidden input voxels are set to 0; the output of every convolution and pooling of the encoder (stem, residual
  path, skip/projection path) is multiplied by the visible mask of its resolution (forward hooks), and every
  instance norm of the encoder is a :class:`SparseInstanceNorm3d`: statistics over visible positions only,
  hidden positions 0 after it. LeakyReLU keeps 0 at 0 and the residual sum adds zeros to zeros, so hidden
  positions are exactly 0 after every layer;
* densification of every decoder input (every skip, deepest included), as nnssl's ``SparK3D``: an instance
  norm without affine parameters over the visible positions, the stage's mask token (``[1, C, 1, 1, 1]``) at
  hidden positions, then a projection (a 3^3 convolution with bias, except an identity for the shallowest
  skip);
* the loss is the MSE over hidden voxels only.

Where a feature map is coarser than the blocks (cumulative stride > ``mask_block``) a position counts as
hidden only when every voxel it covers is hidden (a min-pool), so no visible content is thrown away; where it
is finer or equal, the mask is the block mask subsampled, aligned with the block grid.

The network keeps the encoder at ``.encoder`` and the decoder at ``.decoder``, so its weights are a
``ResidualEncoderUNet``'s (the sparse norms keep the norms' parameter names) plus ``mask_tokens.*`` and
``densify_projs.*``; the final checkpoint holds the U-Net's weights only, as nnssl's ``network_weights`` do
(nnssl keeps the densifier in a second entry, ``spark_weights``, for resuming only; here the resume checkpoint
``checkpoint_latest.pth`` holds it).

Example:
    >>> trainer = METHODS.get("spark3d")({"preset": "resenc_demo", "patch_size": [32, 32, 32], "iterations": 10},
    ...                                  records, in_channels=1, out_path="ckpt.pth", seed=0)  # doctest: +SKIP
    >>> trainer.run()  # doctest: +SKIP
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pretrain_det3d.pretraining.masking import MASK_BLOCK, MASK_RATIO, block_grid, block_mask, masked_mse
from pretrain_det3d.pretraining.trainer import METHODS, PretrainingTrainer
from pretrain_det3d.settings.pretraining import Spark3DSettings
from pretrain_det3d.settings.pretraining import training_defaults as method_training_defaults

# SparK's initialisation of the mask tokens: normal with std 0.02, truncated at +-1 std (nnssl spark_model.py
# and SparK's spark.py both call trunc_normal_(std=.02, a=-.02, b=.02))
MASK_TOKEN_STD = Spark3DSettings.default("mask_token_std")
# the densifier's norm is nnssl's SparseInstanceNorm3d(C): torch's defaults, eps 1e-5, no affine parameters
DENSIFY_NORM_EPS = 1e-5
# the densifier's projection: a 3^3 convolution with bias, kernel 3 as in nnssl's SparK3D (identity at stage 0)
DENSIFY_KERNEL = 3
# layers whose output is re-masked after every call (nnssl converts these to its Sparse* classes)
MASKED_OUTPUT_LAYERS = (nn.Conv3d, nn.AvgPool3d, nn.MaxPool3d)
# layers that keep exact zeros at zero and mix no positions, so need no mask (LeakyReLU(0) = 0)
POINTWISE_ZERO_PRESERVING = (nn.LeakyReLU, nn.ReLU, nn.Identity)
CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)  # an empty one computes nothing


def cumulative_strides(strides: Sequence[Sequence[int] | int]) -> list[tuple[int, int, int]]:
    """Per-axis stride of each stage's output relative to the input.

    Example:
        >>> cumulative_strides([1, [2, 2, 1], 2])
        [(1, 1, 1), (2, 2, 1), (4, 4, 2)]
    """
    out, total = [], (1, 1, 1)
    for stride in strides:
        per_axis = (int(stride),) * 3 if isinstance(stride, int) else tuple(int(s) for s in stride)
        total = tuple(t * s for t, s in zip(total, per_axis))  # type: ignore[assignment]
        out.append(total)
    return out


def downsample_mask(mask: torch.Tensor, stride: Sequence[int]) -> torch.Tensor:
    """The hidden-voxel mask ``[B, 1, Z, Y, X]`` at a resolution ``stride`` times coarser.

    A coarse position is hidden only if all the voxels it covers are hidden (min-pool); on a block-aligned
    mask with blocks at least ``stride`` wide this is the mask subsampled (nearest).

    Example:
        >>> m = torch.tensor([True, True, True, False]).reshape(1, 1, 4, 1, 1)
        >>> downsample_mask(m, (2, 1, 1)).ravel().tolist()
        [True, False]
    """
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be boolean, got {mask.dtype}")
    stride = tuple(int(s) for s in stride)
    if any(size % s for size, s in zip(mask.shape[2:], stride)):
        raise ValueError(f"mask of spatial shape {tuple(mask.shape[2:])} cannot be pooled by stride {stride}")
    if stride == (1, 1, 1):
        return mask
    visible = F.max_pool3d((~mask).float(), kernel_size=stride, stride=stride)  # 1 where any voxel is visible
    return visible == 0


def stage_masks(mask: torch.Tensor, strides: Sequence[Sequence[int] | int]) -> list[torch.Tensor]:
    """:func:`downsample_mask` for every encoder stage (``strides``: the per-stage strides).

    Example:
        >>> m = block_mask(1, (8, 8, 8), 4, 0.75, torch.Generator().manual_seed(0))
        >>> [tuple(s.shape[2:]) for s in stage_masks(m, [1, 2, 2])]
        [(8, 8, 8), (4, 4, 4), (2, 2, 2)]
    """
    return [downsample_mask(mask, stride) for stride in cumulative_strides(strides)]


def masked_instance_norm(
    x: torch.Tensor,
    visible: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = DENSIFY_NORM_EPS,
) -> torch.Tensor:
    """Instance norm of ``x`` ``[B, C, z, y, x]`` with per-sample, per-channel statistics (mean, biased
    variance) over the positions where ``visible`` ``[B, 1, z, y, x]`` is 1; hidden positions come out 0.

    This is what nnssl's ``SparseInstanceNorm3d`` computes by gathering the visible positions; the statistics
    are accumulated in at least float32 (also under autocast), and the result has the input's dtype.

    Example:
        >>> x = torch.tensor([1.0, 3.0, 100.0]).reshape(1, 1, 3, 1, 1)
        >>> visible = torch.tensor([1.0, 1.0, 0.0]).reshape(1, 1, 3, 1, 1)
        >>> [round(v, 4) for v in masked_instance_norm(x, visible).ravel().tolist()]
        [-1.0, 1.0, 0.0]
    """
    dtype = torch.promote_types(x.dtype, torch.float32)  # half and bfloat16 accumulate in float32
    v = visible.to(dtype)
    xs = x.to(dtype)
    count = v.sum(dim=(2, 3, 4), keepdim=True).clamp_min(1.0)  # [B, 1, 1, 1, 1]; a sample with none stays 0
    mean = (xs * v).sum(dim=(2, 3, 4), keepdim=True) / count  # [B, C, 1, 1, 1]
    centred = (xs - mean) * v  # hidden positions are 0 from here on
    var = (centred * centred).sum(dim=(2, 3, 4), keepdim=True) / count
    out = centred * torch.rsqrt(var + eps)
    if weight is not None:
        out = out * weight.to(dtype).view(1, -1, 1, 1, 1)
    if bias is not None:
        out = out + bias.to(dtype).view(1, -1, 1, 1, 1) * v  # the bias only where there are features
    return out.to(x.dtype)


class SparseEmulation:
    """The hidden-voxel mask of the forward pass in progress, shared by the sparse layers of one encoder.

    Outside :meth:`masked` it holds no mask and the encoder's layers compute densely, as usual.

    Example:
        >>> sparse = SparseEmulation()
        >>> hidden = torch.tensor([True, False]).reshape(1, 1, 2, 1, 1)
        >>> with sparse.masked(hidden):
        ...     sparse.visible(torch.zeros(1, 4, 2, 1, 1)).ravel().tolist()
        [0.0, 1.0]
        >>> sparse.visible(torch.zeros(1, 4, 2, 1, 1)) is None
        True
    """

    def __init__(self) -> None:
        self.hidden: torch.Tensor | None = None  # [B, 1, Z, Y, X] bool at input resolution, True = hidden
        self._visible: dict[tuple[int, ...], torch.Tensor] = {}

    @contextmanager
    def masked(self, hidden: torch.Tensor) -> Iterator[None]:
        """Run the encoder sparsely on input mask ``hidden`` within this block."""
        if hidden.dtype != torch.bool or hidden.dim() != 5 or hidden.shape[1] != 1:
            raise ValueError(f"the hidden mask must be boolean [B, 1, Z, Y, X], got {hidden.dtype} "
                             f"{tuple(hidden.shape)}")
        self.hidden, self._visible = hidden, {}
        try:
            yield
        finally:
            self.hidden, self._visible = None, {}

    def visible(self, like: torch.Tensor) -> torch.Tensor | None:
        """The visible mask (1 = visible) ``[B, 1, z, y, x]`` for a feature map ``like``, in its dtype and
        on its device; ``None`` when no mask is set."""
        if self.hidden is None:
            return None
        size = tuple(like.shape[2:])
        key = (*size, like.dtype)
        if key not in self._visible:
            full = tuple(self.hidden.shape[2:])
            if like.shape[0] != self.hidden.shape[0] or any(f % s for f, s in zip(full, size)):
                raise ValueError(f"feature map {tuple(like.shape)} does not match the mask {tuple(self.hidden.shape)}")
            stride = tuple(f // s for f, s in zip(full, size))
            self._visible[key] = (~downsample_mask(self.hidden, stride)).to(device=like.device, dtype=like.dtype)
        return self._visible[key]


class _MaskOutput:
    """Forward hook: the layer's output times the visible mask of its resolution (a callable object rather
    than a closure, so a deep copy of the network hooks the copy's own :class:`SparseEmulation`)."""

    def __init__(self, sparse: SparseEmulation) -> None:
        self.sparse = sparse

    def __call__(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor | None:
        visible = self.sparse.visible(output)
        return None if visible is None else output * visible


class SparseInstanceNorm3d(nn.InstanceNorm3d):
    """``nn.InstanceNorm3d`` that, while its :class:`SparseEmulation` holds a mask, normalises with the
    statistics of visible positions only and outputs 0 at hidden ones; dense otherwise.

    Built from an existing norm whose parameters it shares (same names, so state dicts do not change).

    Example:
        >>> sparse = SparseEmulation()
        >>> norm = SparseInstanceNorm3d(nn.InstanceNorm3d(2, affine=True), sparse)
        >>> sorted(norm.state_dict())
        ['bias', 'weight']
    """

    def __init__(self, norm: nn.InstanceNorm3d, sparse: SparseEmulation) -> None:
        if norm.track_running_stats:
            raise ValueError("SparK's sparse instance norm has no running statistics (track_running_stats=False)")
        super().__init__(norm.num_features, eps=norm.eps, momentum=norm.momentum, affine=norm.affine,
                         track_running_stats=False)
        if norm.affine:
            self.weight, self.bias = norm.weight, norm.bias  # the very Parameters of the dense norm
        self.sparse = sparse

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        visible = self.sparse.visible(x)
        if visible is None:
            return super().forward(x)
        return masked_instance_norm(x, visible, self.weight, self.bias, self.eps)


def sparsify_encoder(encoder: nn.Module, sparse: SparseEmulation) -> nn.Module:
    """Make ``encoder`` (in place) compute sparsely whenever ``sparse`` holds a mask: every ``Conv3d`` and
    pooling gets a hook that re-masks its output, every ``InstanceNorm3d`` becomes a
    :class:`SparseInstanceNorm3d` (at every place it is registered: dynamic_network_architectures registers
    each norm twice, as ``.norm`` and in ``.all_modules``). Layers that could carry content into hidden
    positions other than these (batch norm, dropout, ...) are refused.

    Example:
        >>> from pretrain_det3d.models.backbone import build_resenc_encoder
        >>> encoder = sparsify_encoder(build_resenc_encoder("resenc_demo", 1), SparseEmulation())
        >>> sum(isinstance(m, SparseInstanceNorm3d) for m in encoder.modules()) > 0
        True
    """
    replaced: dict[int, SparseInstanceNorm3d] = {}
    for module in list(encoder.modules()):
        if isinstance(module, SparseInstanceNorm3d):
            raise ValueError("the encoder is already sparse")
        if isinstance(module, nn.InstanceNorm3d):
            replaced[id(module)] = SparseInstanceNorm3d(module, sparse)
        elif isinstance(module, MASKED_OUTPUT_LAYERS):
            module.register_forward_hook(_MaskOutput(sparse))
        elif not list(module.children()) and not isinstance(module, POINTWISE_ZERO_PRESERVING + CONTAINERS):
            raise TypeError(f"no sparse emulation for encoder layer {type(module).__name__}")
    for module in list(encoder.modules()):
        for name, child in list(module.named_children()):
            if id(child) in replaced:
                setattr(module, name, replaced[id(child)])
    return encoder


class SparkNetwork(nn.Module):
    """A ResEnc U-Net run the SparK way: sparse encoding, densification of every skip, dense decoding.

    Built from a ``ResidualEncoderUNet`` (its ``encoder`` and ``decoder`` are adopted and its encoder made
    sparse with :func:`sparsify_encoder`, so the state-dict keys stay the U-Net's); ``forward(images, mask)``
    takes the hidden-voxel mask ``[B, 1, Z, Y, X]``.

    Example:
        >>> from pretrain_det3d.models.backbone import build_resenc_unet
        >>> net = SparkNetwork(build_resenc_unet("resenc_demo", 1, 1))
        >>> mask = block_mask(1, (16, 16, 16), 8, 0.75, torch.Generator().manual_seed(0))
        >>> net(torch.randn(1, 1, 16, 16, 16), mask).shape
        torch.Size([1, 1, 16, 16, 16])
    """

    def __init__(self, unet: nn.Module, mask_token_std: float = MASK_TOKEN_STD) -> None:
        super().__init__()
        if not hasattr(unet, "encoder") or not hasattr(unet, "decoder"):
            raise TypeError(f"SparkNetwork needs a U-Net with .encoder and .decoder, got {type(unet).__name__}")
        self.sparse = SparseEmulation()
        self.encoder = sparsify_encoder(unet.encoder, self.sparse)
        self.decoder = unet.decoder
        self.strides = [list(s) if not isinstance(s, int) else [s] * 3 for s in self.encoder.strides]
        tokens, projections = [], []
        for stage, channels in enumerate(int(c) for c in self.encoder.output_channels):
            token = nn.Parameter(torch.zeros(1, channels, 1, 1, 1))
            nn.init.trunc_normal_(token, mean=0.0, std=mask_token_std, a=-mask_token_std, b=mask_token_std)
            tokens.append(token)
            # nnssl: the shallowest skip goes to the decoder as it is, every deeper one through a 3^3 conv
            projections.append(nn.Identity() if stage == 0 else
                               nn.Conv3d(channels, channels, DENSIFY_KERNEL, padding=DENSIFY_KERNEL // 2, bias=True))
        self.mask_tokens = nn.ParameterList(tokens)  # one per stage, shallowest first
        self.densify_projs = nn.ModuleList(projections)

    def encode(self, images: torch.Tensor, mask: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Stage outputs (hidden positions exactly 0 after every layer) and the stage masks, shallowest first."""
        with self.sparse.masked(mask):
            skips = self.encoder(images.masked_fill(mask, 0.0))  # [B, C, Z, Y, X]; the mask broadcasts
        return list(skips), stage_masks(mask, self.strides)

    def densify(self, skips: Sequence[torch.Tensor], masks: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Each skip normalised over its visible positions, its hidden positions replaced by the stage's mask
        token, then projected (nnssl's ``SparK3D`` densification)."""
        dense = []
        for skip, stage_mask, token, projection in zip(skips, masks, self.mask_tokens, self.densify_projs):
            normed = masked_instance_norm(skip, (~stage_mask).to(skip.dtype), eps=DENSIFY_NORM_EPS)
            filled = torch.where(stage_mask, token.to(normed.dtype), normed)  # [B,1,...] x [1,C,1,1,1] x [B,C,...]
            dense.append(projection(filled))
        return dense

    def forward(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        skips, masks = self.encode(images, mask)
        return self.decoder(self.densify(skips, masks))

    def unet_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights without the pre-training head (mask tokens, densifier): exactly a
        ``ResidualEncoderUNet``'s state dict."""
        return {k: v for k, v in self.state_dict().items() if k.startswith(("encoder.", "decoder."))}


@METHODS.register("spark3d")
class Spark3DTrainer(PretrainingTrainer):
    """Settings read besides the training loop's: ``preset``, ``mask_ratio`` (0.75), ``mask_block`` (16),
    ``mask_token_std`` (0.02)."""

    method = "spark3d"
    training_defaults = method_training_defaults("spark3d")
    # part of the run fingerprint: checkpoints of the earlier re-mask-per-stage emulation (no densifier) are
    # refused on resume instead of failing on missing keys
    SPARSE_SEMANTICS = "per-layer sparse encoder, nnssl densifier"

    def __init__(self, settings: dict[str, Any], *args: Any, **kwargs: Any) -> None:
        self.mask_ratio = float(settings.get("mask_ratio", MASK_RATIO))
        self.mask_block = int(settings.get("mask_block", MASK_BLOCK))
        self.mask_token_std = float(settings.get("mask_token_std", MASK_TOKEN_STD))
        super().__init__(settings, *args, **kwargs)
        block_grid(self.settings.patch_size, self.mask_block)  # fail now, naming the key, not mid-training
        deepest = cumulative_strides(self.model.strides)[-1]
        if any(p % s for p, s in zip(self.settings.patch_size, deepest)):
            raise ValueError(
                f"settings key 'patch_size' {list(self.settings.patch_size)} must be divisible by the encoder's "
                f"total stride {list(deepest)} (preset {self.preset!r})"
            )

    def build_network(self) -> torch.nn.Module:
        from pretrain_det3d.models.backbone import build_resenc_unet

        unet = build_resenc_unet(self.preset, self.in_channels, out_channels=self.in_channels)
        return SparkNetwork(unet, self.mask_token_std)

    def fingerprint_model(self) -> dict[str, Any]:
        return {**super().fingerprint_model(), "sparse_semantics": self.SPARSE_SEMANTICS}

    def make_mask(self, batch_size: int) -> torch.Tensor:
        """This iteration's mask ``[B, 1, Z, Y, X]`` (True = hidden); reproduced exactly on resume."""
        return block_mask(batch_size, self.settings.patch_size, self.mask_block, self.mask_ratio,
                          generator=self.batch_generator())

    def compute_losses(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        images = batch["images"]  # [B, C, Z, Y, X]
        mask = self.make_mask(images.shape[0]).to(images.device)
        reconstruction = self.model(images, mask)
        return {"loss": masked_mse(reconstruction, images, mask)}

    def save_final(self) -> None:
        # The checkpoint holds a plain ResidualEncoderUNet (what its architecture plan rebuilds); loading
        # strictly proves that the adopted encoder/decoder keys are exactly the U-Net's.
        from pretrain_det3d.models.backbone import build_resenc_unet
        from pretrain_det3d.models.checkpoint import save_pretraining_checkpoint

        unet = build_resenc_unet(self.preset, self.in_channels, out_channels=self.in_channels)
        unet.load_state_dict({k: v.detach().cpu() for k, v in self.model.unet_state_dict().items()}, strict=True)
        save_pretraining_checkpoint(self.out_path, unet, self.preset, self.in_channels,
                                    list(self.settings.patch_size), self.method,
                                    pretrain_plan=self.pretrain_plan(self.settings.patch_size))
