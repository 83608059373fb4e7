"""Turning image splits into what a vision model reads: ``pixel_values`` resized, rescaled and
normalised as the model's preprocessor config says (:class:`ImageProcessor`), held as
:class:`ImageRows` for the trainer. torch is imported only when images are processed.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from slimtune.errors import SlimtuneError
from slimtune.zoo.image_sources import ImageSplit, read_image
from slimtune.zoo.model_registry import model_dir


@dataclass
class ImageRows:
    """A split ready for the model: ``pixel_values`` (N, C, H, W) float and ``labels`` (N,)."""

    pixel_values: Any  # torch.Tensor
    labels: Any  # torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __bool__(self) -> bool:
        return len(self) > 0

    def batch(self, indices: Sequence[int], with_labels: bool = True) -> dict[str, Any]:
        import torch

        index = torch.as_tensor(list(indices), dtype=torch.long)
        out = {"pixel_values": self.pixel_values[index]}
        if with_labels:
            out["labels"] = self.labels[index]
        return out


@dataclass
class ImageProcessor:
    """Resize to the model's size, rescale to [0, 1], normalise by the model's mean/std.

    Read from the model's ``preprocessor_config.json`` (the Hugging Face ``ViTImageProcessor``
    keys: ``size``, ``do_rescale``/``rescale_factor``, ``do_normalize``/``image_mean``/``image_std``)
    and its ``config.json`` (``num_channels``, ``image_size`` when there is no preprocessor config).
    Grey images are repeated to 3 channels for an RGB model; colour images are converted to grey
    (ITU-R 601 luma, as PIL's "L") for a 1-channel model. Resizing is bilinear with antialiasing
    (PIL's default for ViT is bilinear too), applied to whole batches.
    """

    height: int
    width: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    rescale_factor: float = 1 / 255
    do_rescale: bool = True
    do_normalize: bool = True
    pad_token_id: None = None  # the trainer asks a "tokenizer" for its pad id; images have none

    @classmethod
    def from_model_dir(cls, directory: Path) -> ImageProcessor:
        config = json.loads((directory / "config.json").read_text())
        channels = int(config.get("num_channels", 3))
        pre_path = directory / "preprocessor_config.json"
        pre = json.loads(pre_path.read_text()) if pre_path.is_file() else {}
        size = pre.get("size", config.get("image_size", 224))
        if isinstance(size, Mapping):
            height, width = int(size.get("height", size.get("shortest_edge", 224))), int(size.get("width", size.get("shortest_edge", 224)))
        else:
            height = width = int(size)
        mean = tuple(float(v) for v in pre.get("image_mean", [0.5] * channels))
        std = tuple(float(v) for v in pre.get("image_std", [0.5] * channels))
        if len(mean) == 1 and channels > 1:
            mean, std = mean * channels, std * channels
        if len(mean) != channels or len(std) != channels:
            raise SlimtuneError(f"{pre_path}: image_mean/image_std have {len(mean)}/{len(std)} values for a {channels}-channel model")
        return cls(
            height=height, width=width, channels=channels, mean=mean, std=std,
            rescale_factor=float(pre.get("rescale_factor", 1 / 255)), do_rescale=bool(pre.get("do_rescale", True)),
            do_normalize=bool(pre.get("do_normalize", True)),
        )

    def _as_float_batch(self, images: np.ndarray):
        """uint8 (N, H, W[, C]) -> float (N, C, H, W) in the model's channels, unscaled."""
        import torch

        array = np.asarray(images)
        tensor = torch.from_numpy(np.require(array, requirements=["C", "W"])).float()  # W: a read-only view is copied
        tensor = tensor.unsqueeze(1) if tensor.dim() == 3 else tensor.permute(0, 3, 1, 2)
        have = tensor.shape[1]
        if have == 4:  # RGBA: drop alpha
            tensor, have = tensor[:, :3], 3
        if have == self.channels:
            return tensor
        if have == 1:
            return tensor.expand(-1, self.channels, -1, -1)
        if have == 3 and self.channels == 1:
            weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
            return (tensor * weights).sum(1, keepdim=True)
        raise SlimtuneError(f"images with {have} channels cannot feed a {self.channels}-channel model")

    def __call__(self, images: np.ndarray):
        """uint8 images (N, H, W[, C]) of one size -> normalised ``pixel_values`` (N, C, H, W)."""
        import torch
        import torch.nn.functional as F

        pixels = self._as_float_batch(images)
        if pixels.shape[-2:] != (self.height, self.width):
            pixels = F.interpolate(pixels, size=(self.height, self.width), mode="bilinear", align_corners=False, antialias=True)
        if self.do_rescale:
            pixels = pixels * self.rescale_factor
        if self.do_normalize:
            mean = torch.tensor(self.mean).view(1, -1, 1, 1)
            std = torch.tensor(self.std).view(1, -1, 1, 1)
            pixels = (pixels - mean) / std
        return pixels.contiguous()

    def encode_split(self, split: ImageSplit, chunk: int = 4096) -> ImageRows:
        import torch

        if isinstance(split.images, np.ndarray):
            parts = [self(split.images[start : start + chunk]) for start in range(0, len(split), chunk)]
        else:  # user files: decode one by one (sizes may differ)
            parts = [self(read_image(path)[None]) for path in split.images]
        pixels = torch.cat(parts) if parts else torch.empty(0, self.channels, self.height, self.width)
        return ImageRows(pixels, torch.from_numpy(np.asarray(split.labels, dtype=np.int64)))


def load_image_processor(name_or_path: str) -> ImageProcessor:
    """The image processor matched to a (registered or local) vision model."""
    return ImageProcessor.from_model_dir(model_dir(name_or_path))
