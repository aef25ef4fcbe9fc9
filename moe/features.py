"""Containers passed between the encoder, the MoE units and the scorer."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor


@dataclass
class Features:
    """Encoder output for a batch of B inputs (mentions or entities).

    Shapes: text_global [B, dt], text_tokens [B, Lt, dt], text_mask [B, Lt] (bool, True = real
    token), image_global [B, dv], image_tokens [B, Lv, dv], image_mask [B] (bool, True = the
    input has an image). Rows without an image hold zeros in the image tensors; the matcher
    replaces them by learned "no image" vectors, so a missing image is never read as a black
    picture.
    """

    text_global: Tensor
    text_tokens: Tensor
    text_mask: Tensor
    image_global: Tensor
    image_tokens: Tensor
    image_mask: Tensor

    def __len__(self) -> int:
        return self.text_global.shape[0]

    def index(self, rows: Tensor | slice) -> Features:
        return Features(**{f.name: getattr(self, f.name)[rows] for f in fields(self)})

    @staticmethod
    def cat(parts: list[Features]) -> Features:
        return Features(**{f.name: torch.cat([getattr(p, f.name) for p in parts]) for f in fields(Features)})


class SideCache:
    """Per-input tensors of one side (mention or entity) after the MoE units, keyed by name.

    Every tensor's first dimension is the input index, so a cache built once for the whole KB
    can be sliced into blocks, concatenated across ranks, moved and saved.
    """

    def __init__(self, tensors: dict[str, Tensor]) -> None:
        sizes = {t.shape[0] for t in tensors.values()}
        if len(sizes) > 1:
            raise ValueError(f"inconsistent first dimensions in side cache: {sorted(sizes)}")
        self.tensors = tensors

    def __len__(self) -> int:
        return next(iter(self.tensors.values())).shape[0] if self.tensors else 0

    def __getitem__(self, name: str) -> Tensor:
        return self.tensors[name]

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def slice(self, start: int, stop: int) -> SideCache:
        return SideCache({k: v[start:stop] for k, v in self.tensors.items()})

    def select(self, rows: Tensor) -> SideCache:
        return SideCache({k: v[rows] for k, v in self.tensors.items()})

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> SideCache:
        def move(t: Tensor) -> Tensor:
            return t.to(device=device, dtype=dtype if (dtype is not None and t.is_floating_point()) else None)

        return SideCache({k: move(v) for k, v in self.tensors.items()})

    def detach(self) -> SideCache:
        return SideCache({k: v.detach() for k, v in self.tensors.items()})

    @staticmethod
    def cat(parts: list[SideCache]) -> SideCache:
        if not parts:
            raise ValueError("cannot concatenate an empty list of side caches")
        return SideCache({k: torch.cat([p.tensors[k] for p in parts]) for k in parts[0].tensors})
