"""Settings of the shared training loop (fine-tuning and pre-training alike).

Defaults are the paper's Retina U-Net fine-tuning recipe where it fixes them (DESIGN.md: SGD Nesterov 0.9,
lr 0.01, weight decay 3e-5, poly decay with warm-up); detectors and pre-training methods override some of them
in their own settings classes (``settings.detectors``, ``settings.pretraining``).

Example:
    >>> s = TrainingSettings.from_settings({"iterations": 10, "warmup_iterations": 2, "preset": "ignored"})
    >>> s.iterations, s.optimizer, s.grad_clip, s.patch_size
    (10, 'sgd', 12.0, (64, 64, 64))
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Mapping

from pydantic import BeforeValidator, Field, WithJsonSchema, model_validator

from pretrain_det3d.settings.base import ConfigError, Settings

GRAD_CLIP_NORM = 12.0
AMP_DTYPE_CHOICES = ("auto", "bfloat16", "float16")
CHANNELS_LAST_CHOICES = ("auto", True, False)

def as_triple(value: Any) -> Any:
    """``n`` -> ``[n, n, n]``; lists and tuples pass through for the type check."""
    if isinstance(value, (int, str)) and not isinstance(value, bool):
        return [value] * 3
    return value


#: three positive integers [z, y, x]; one number means the same on every axis
Triple = Annotated[
    tuple[int, int, int],
    BeforeValidator(as_triple),
    WithJsonSchema({"anyOf": [{"type": "integer", "minimum": 1},
                              {"type": "array", "items": {"type": "integer", "minimum": 1},
                               "minItems": 3, "maxItems": 3}]}),
]


class AugmentationSettings(Settings):
    """Probabilities and ranges of every augmentation: nnDetection's ``more_modular_ord1`` (the authors' release).

    Angles are in degrees and drawn per axis; ``scaling_range`` multiplies the sampling grid (a factor above 1
    shows more of the image, so objects look smaller; half the draws fall below 1, half above, as nnDetection
    draws them; so do the contrast and gamma factors). Set a probability to 0 to switch a transform off.
    ``training.augmentation`` builds the transforms from it (there it is also named ``AugmentationParams``).

    Example:
        >>> AugmentationSettings().p_rotation
        0.2
        >>> AugmentationSettings.from_settings({"p_rotation": 0.0}).p_rotation
        0.0
    """

    p_rotation: float = Field(0.2, ge=0, le=1, description="Probability of a rotation.")
    rotation_degrees: tuple[float, float] = Field((-30.0, 30.0), description="Rotation range per axis (degrees).")
    p_scaling: float = Field(0.2, ge=0, le=1, description="Probability of a scaling.")
    scaling_range: tuple[float, float] = Field((0.7, 1.4), description="Scaling range of the sampling grid.")
    mirror_axes: tuple[int, ...] = Field((0, 1, 2), description="Axes mirrored with probability 0.5 each.")
    p_noise: float = Field(0.1, ge=0, le=1, description="Probability of Gaussian noise.")
    noise_variance: tuple[float, float] = Field((0.0, 0.1), description="Noise variance range.")
    p_blur: float = Field(0.2, ge=0, le=1, description="Probability of a Gaussian blur (per sample).")
    p_blur_per_channel: float = Field(0.5, ge=0, le=1, description="Probability that a blurred sample's channel "
                                      "is blurred (each channel its own sigma).")
    blur_sigma: tuple[float, float] = Field((0.5, 1.0), description="Gaussian blur sigma range (voxels, the same "
                                            "on every axis).")
    p_brightness: float = Field(0.15, ge=0, le=1, description="Probability of a multiplicative brightness change.")
    brightness_range: tuple[float, float] = Field((0.75, 1.25), description="Brightness factor range.")
    p_contrast: float = Field(0.15, ge=0, le=1, description="Probability of a contrast change.")
    contrast_range: tuple[float, float] = Field((0.75, 1.25), description="Contrast factor range.")
    p_gamma: float = Field(0.3, ge=0, le=1, description="Probability of a gamma change.")
    gamma_range: tuple[float, float] = Field((0.7, 1.5), description="Gamma range.")
    p_gamma_inverted: float = Field(0.1, ge=0, le=1, description="Probability of a gamma change of the inverted "
                                    "image.")
    use_extraction_margin: bool = Field(True, description="Read extra voxels around the patch so rotation and "
                                        "scaling sample real image content.")

    @classmethod
    def from_settings(cls, overrides: Mapping[str, Any] | None) -> "AugmentationSettings":
        """Defaults updated by ``overrides``; unknown keys raise an error naming them."""
        return cls.parse(overrides, where="augmentation")

    @property
    def spatial_enabled(self) -> bool:
        return self.p_rotation > 0 or self.p_scaling > 0


class TrainingSettings(Settings):
    """Every knob of the iteration-based training loop (``training.trainer.IterationTrainer``)."""

    iterations: int = Field(1000, gt=0, description="Optimiser steps of the run.")
    batch_size: int = Field(2, gt=0, description="Patches per step (the paper: 4).")
    patch_size: Triple = Field((64, 64, 64), description="Training patch [z, y, x] in voxels (the paper: 128^3); "
                               "one number means a cube.")
    optimizer: Literal["sgd", "adamw"] = Field("sgd", description="SGD with Nesterov momentum, or AdamW.")
    lr: float = Field(0.01, ge=0, description="Peak learning rate, reached after the warm-up; poly decay after.")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum (Nesterov).")
    weight_decay: float = Field(3e-5, ge=0, description="Weight decay.")
    adam_betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW: (beta1, beta2) (torch's default).")
    adam_eps: float = Field(1e-8, gt=0, description="AdamW: eps added to the denominator (torch's default).")
    amsgrad: bool = Field(False, description="AdamW: the AMSGrad variant (torch's default: off).")
    warmup_iterations: int = Field(100, ge=0, description="Linear warm-up steps (must be below iterations).")
    warmup_start_lr: float = Field(1e-6, ge=0, description="Learning rate the linear warm-up "
                                   "starts from (nnDetection's warm_lr).")
    grad_clip: float | None = Field(GRAD_CLIP_NORM, gt=0, description="Gradient-norm clipping; null: off.")
    checkpoint_every: int = Field(100, gt=0, description="Write checkpoint_latest.pth every this many steps.")
    num_workers: int = Field(0, ge=0, description="Data-loading worker processes (0: in the training process).")
    augmentation: bool | AugmentationSettings = Field(
        True, description="true: the default augmentation; false: none; a mapping: overrides of the "
        "augmentation settings (below).")
    foreground_fraction: float = Field(0.5, ge=0, le=1, description="Share of each batch's patches placed around "
                                       "an object (class, then object drawn uniformly; nnDetection's obj_bal).")
    device: str = Field("auto", description="'auto' (CUDA when available), 'cpu' or 'cuda[:i]'.")
    threads: int | None = Field(None, gt=0, description="torch.set_num_threads; null leaves torch's choice.")
    mixed_precision: bool = Field(True, description="Autocast on CUDA (see amp_dtype).")
    amp_dtype: Literal["auto", "bfloat16", "float16"] = Field(
        "auto", description="'auto': bf16 where the GPU has it, else fp16; 'bfloat16' also autocasts on CPU.")
    cudnn_benchmark: bool = Field(True, description="CUDA only: let cuDNN pick the fastest convolutions.")
    pin_memory: bool = Field(True, description="CUDA only: page-locked batches, non-blocking copies.")
    persistent_workers: bool = Field(True, description="With num_workers > 0: keep loader processes alive.")
    prefetch_factor: int = Field(2, gt=0, description="With num_workers > 0: batches each worker prepares ahead.")
    memory_map: bool = Field(True, description="Read patches from memory-mapped arrays instead of whole cases.")
    compile: bool = Field(False, description="torch.compile the model's forward.")
    channels_last: bool | Literal["auto"] = Field(
        "auto", description="3D conv weights in channels-last layout; 'auto': on CPU only (docs/benchmark.md).")
    keep_latest_checkpoint: bool = Field(False, description="Keep checkpoint_latest.pth after the final model.")
    progress_bar: bool = Field(True, description="Show progress (a bar on a terminal, periodic lines in logs).")
    log_every: int | None = Field(None, gt=0, description="Progress line every this many iterations when the "
                                  "output is not a terminal; null: about 100 lines per run, at least one per 500.")

    @model_validator(mode="after")
    def _warmup_below_iterations(self) -> "TrainingSettings":
        if not 0 <= self.warmup_iterations < self.iterations:
            raise ValueError(f"warmup_iterations must lie in [0, iterations={self.iterations}), "
                             f"got {self.warmup_iterations}")
        return self

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any] | None, **defaults: Any) -> "TrainingSettings":
        """Training keys of ``settings`` over ``defaults`` over the class defaults.

        Other keys of ``settings`` are ignored here: they belong to the detector or pre-training method, whose
        own settings class (a subclass of this one) checks them.
        """
        known = set(cls.model_fields)
        bad = sorted(set(defaults) - known)
        if bad:
            raise KeyError(f"unknown training defaults {bad}")
        values = {**defaults, **{k: v for k, v in dict(settings or {}).items() if k in known}}
        return cls.parse(values, where="settings")

    def augmentation_params(self) -> AugmentationSettings | None:
        """The augmentation of this run, or ``None`` when augmentation is off."""
        if self.augmentation is True:
            return AugmentationSettings()
        if self.augmentation is False:
            return None
        return self.augmentation


def changed_loop_defaults(cls: type[TrainingSettings]) -> dict[str, Any]:
    """The training-loop defaults of ``cls`` that differ from ``TrainingSettings``'s (a detector's or method's
    own recipe, handed to ``TrainingSettings.from_settings``)."""
    return {k: cls.default(k) for k in TrainingSettings.model_fields if cls.default(k) != TrainingSettings.default(k)}


def registered(registry: Mapping[str, type[Settings]], name: str, where: str, what: str) -> type[Settings]:
    """``registry[name]``; an unknown name is a :class:`ConfigError` naming ``where`` and the registered ones."""
    try:
        return registry[name]
    except KeyError:
        raise ConfigError(f"config key {where!r}: no registered {what} {name!r}; registered: "
                          f"{', '.join(sorted(registry))}") from None
