"""Turn shard samples into model batches: CLIP tokenisation and normalised image tensors.

Text: mentions ``mention [SEP] sentence [SEP] description``, entities ``name [SEP] description``
(``mention_desc`` / ``entity_desc`` False drop the description of that side), max length 50,
padded to max length.
Images: the converter already resized and cropped them; here they are decoded and normalised
with the CLIP mean and std. Inputs without an image get a zero pixel row and ``image_mask``
False (the model never reads that row).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from transformers import AutoTokenizer, PreTrainedTokenizerBase
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

SEP = " [SEP] "


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "sentencepiece.bpe.model",
                   "spiece.model")


def has_tokenizer(folder: str | Path) -> bool:
    """Whether a model folder holds a tokenizer (any of the files Hugging Face tokenizers are saved as)."""
    return bool(folder) and any((Path(folder) / name).is_file() for name in TOKENIZER_FILES)


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as err:
        raise OSError(
            f"could not load a tokenizer from {path!r}: give the CLIP folder or the dataset's tokenizer/ folder"
        ) from err


class Collator:
    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        image_size: int,
        max_length: int = 50,
        mention_desc: bool = True,
        entity_desc: bool = True,
        mean: tuple[float, ...] = tuple(OPENAI_CLIP_MEAN),
        std: tuple[float, ...] = tuple(OPENAI_CLIP_STD),
    ) -> None:
        self.tokenizer, self.image_size, self.max_length = tokenizer, image_size, max_length
        self.mention_desc, self.entity_desc = mention_desc, entity_desc
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)

    def mention_text(self, meta: dict) -> str:
        parts = [meta["mention"], meta["sentence"]] + ([meta["desc"]] if self.mention_desc and meta.get("desc") else [])
        return SEP.join(parts)

    def entity_text(self, meta: dict) -> str:
        return SEP.join([meta["name"]] + ([meta["desc"]] if self.entity_desc and meta.get("desc") else []))

    def _tokens(self, texts: list[str]) -> dict[str, Tensor]:
        enc = self.tokenizer(texts, max_length=self.max_length, padding="max_length", truncation=True, return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def _images(self, jpgs: list[bytes | None]) -> dict[str, Tensor]:
        raw = np.zeros((len(jpgs), self.image_size, self.image_size, 3), dtype=np.uint8)
        mask = torch.zeros(len(jpgs), dtype=torch.bool)
        for i, jpg in enumerate(jpgs):
            if jpg is None:
                continue
            raw[i] = self.decode(jpg)
            mask[i] = True
        pixels = self.normalise(raw)
        pixels[~mask] = 0.0  # rows without an image stay exactly zero
        return {"pixel_values": pixels, "image_mask": mask}

    def decode(self, jpg: bytes) -> np.ndarray:
        """A shard's JPEG as uint8 [H, W, 3]; the converter stored it at the model's size, any other is refused."""
        with Image.open(io.BytesIO(jpg)) as img:
            arr = np.asarray(img.convert("RGB"))
        if arr.shape[:2] != (self.image_size, self.image_size):
            raise ValueError(f"image of size {arr.shape[1]}x{arr.shape[0]} in the shards, the model expects "
                             f"{self.image_size}: convert again with --image-size {self.image_size}")
        return arr

    def normalise(self, raw: np.ndarray) -> Tensor:
        """uint8 [B, H, W, 3] -> float [B, 3, H, W], ``(x / 255 - mean) / std``: one contiguous buffer updated in
        place (the same arithmetic, so the same bits, as three out-of-place ops, at a third of the cost)."""
        pixels = torch.empty(raw.shape[0], 3, raw.shape[1], raw.shape[2])
        pixels.copy_(torch.from_numpy(raw).permute(0, 3, 1, 2))
        return pixels.div_(255.0).sub_(self.mean).div_(self.std)

    def mentions(self, samples: list[dict]) -> dict[str, Tensor]:
        metas = [s["json"] for s in samples]
        batch = self._tokens([self.mention_text(m) for m in metas])
        batch.update(self._images([s.get("jpg") for s in samples]))
        batch["gold_id"] = torch.tensor([m["gold_id"] for m in metas], dtype=torch.long)
        batch["index"] = torch.tensor([m["index"] for m in metas], dtype=torch.long)
        return batch

    def entities(self, samples: list[dict]) -> dict[str, Tensor]:
        metas = [s["json"] for s in samples]
        batch = self._tokens([self.entity_text(m) for m in metas])
        batch.update(self._images([s.get("jpg") for s in samples]))
        batch["entity_id"] = torch.tensor([m["id"] for m in metas], dtype=torch.long)
        return batch
