"""Model inputs without torchvision: fixed-size PIL image processing, image keys, prompt tokenisation
with image-token expansion, left padding, and the multimodal rotary positions.

torchvision cannot be imported beside the CPU torch used here, and transformers' ``Qwen2VLProcessor``
needs it, so this module does the processor's work by hand. ``ImagePreprocessor`` gives exactly what
``Qwen2VLImageProcessorPil`` gives for an image of the configured size (the tests check it).
"""
from __future__ import annotations

import hashlib
import os
import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from recbole_vlm2rec.errors import ConfigError


# ----------------------------------------------------------------------------------------------- images
def open_image(image, size: int):
    """Load ``image`` (path, PIL image or None) as an RGB ``size`` x ``size`` PIL image.

    Returns ``(image, None)`` or ``(None, reason)`` with reason ``"missing"`` (None, empty path, no such
    file) or ``"unreadable"`` (not an image, truncated, ...). Never raises for a bad image: an item
    without a usable image keeps its text branch.
    """
    if image is None or (isinstance(image, str) and not image.strip()):
        return None, "missing"
    try:
        if isinstance(image, Image.Image):
            img = image
        else:
            with Image.open(os.fspath(image)) as f:
                f.load()
                img = f.copy()
        img = img.convert("RGB")
    except FileNotFoundError:
        return None, "missing"
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None, "unreadable"
    # A fixed size gives every image the same number of visual tokens: batches need no per-image
    # shapes and the vision cache is one dense array.
    if img.size != (size, size):
        img = img.resize((size, size), Image.BICUBIC)
    return img, None


def image_key(image) -> Optional[str]:
    """A key that changes when the image changes: path + file size + mtime, or a hash of a PIL image's pixels.

    None for a missing image (None, empty path, no such file).
    """
    if image is None or (isinstance(image, str) and not image.strip()):
        return None
    if isinstance(image, Image.Image):
        digest = hashlib.sha1(f"{image.mode}{image.size}".encode() + image.tobytes()).hexdigest()
        return f"pil:{digest}"
    path = os.path.abspath(os.fspath(image))
    try:
        st = os.stat(path)
    except OSError:
        return None
    return f"{path}|{st.st_size}|{st.st_mtime_ns}"


class ImagePreprocessor:
    """Fixed-size Qwen-VL image preprocessing: rescale, normalise, and cut into flattened patches.

    ``image_size`` must be a multiple of ``patch_size * merge_size`` so that the image maps to an exact
    grid of merged visual tokens: ``tokens_per_image = (image_size / patch_size / merge_size) ** 2``.
    """

    def __init__(self, processor, image_size: int):
        factor = processor.patch_size * processor.merge_size
        if image_size % factor:
            lower, upper = max(factor, image_size // factor * factor), (image_size // factor + 1) * factor
            raise ConfigError(
                f"image_size={image_size} is not a multiple of {factor} (patch_size {processor.patch_size} x "
                f"merge_size {processor.merge_size}) for this backbone; use {lower} or {upper}"
            )
        self.image_size = image_size
        self.patch_size = processor.patch_size
        self.temporal_patch_size = processor.temporal_patch_size
        self.merge_size = processor.merge_size
        self.grid = image_size // processor.patch_size  # patches per side
        self.merged_side = self.grid // processor.merge_size  # visual tokens per side
        self.tokens_per_image = self.merged_side ** 2
        self._mean = np.asarray(processor.image_mean, dtype=np.float32)
        self._std = np.asarray(processor.image_std, dtype=np.float32)

    def grid_thw(self, n: int) -> torch.Tensor:
        return torch.tensor([[1, self.grid, self.grid]] * n, dtype=torch.long)

    def __call__(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """``[n * grid * grid, 3 * temporal_patch * patch * patch]`` float32 pixel patches, in the processor's order."""
        p, m, t = self.patch_size, self.merge_size, self.temporal_patch_size
        x = np.stack([np.asarray(img, dtype=np.uint8) for img in images]).astype(np.float32)  # n, H, W, C
        x = (x * np.float32(1 / 255) - self._mean) / self._std
        n, g, gm = len(images), self.grid, self.grid // m
        x = x.transpose(0, 3, 1, 2).reshape(n, 3, gm, m, p, gm, m, p)
        x = x.transpose(0, 2, 5, 3, 6, 1, 4, 7)  # n, gh, gw, mh, mw, C, ph, pw
        # A still image is its own temporal neighbour: repeat it over the temporal patch.
        x = np.broadcast_to(x[:, :, :, :, :, :, None], (*x.shape[:6], t, p, p))
        return torch.from_numpy(np.ascontiguousarray(x).reshape(n * g * g, 3 * t * p * p))


# ----------------------------------------------------------------------------------------------- tokens
@dataclass
class TokenBatch:
    """A left-padded batch: ids, attention mask and the 3-row multimodal rotary positions."""

    input_ids: torch.Tensor  # [B, L] long
    attention_mask: torch.Tensor  # [B, L] long
    position_ids: torch.Tensor  # [3, B, L] long
    num_images: int
    padded: bool  # False when all rows have the same length

    def to(self, device) -> "TokenBatch":
        # non_blocking: a blocking host-to-GPU copy would wait for all queued kernels.
        return TokenBatch(self.input_ids.to(device, non_blocking=True), self.attention_mask.to(device, non_blocking=True),
                          self.position_ids.to(device, non_blocking=True), self.num_images, self.padded)


class _LRU(OrderedDict):
    """A dict that forgets its least recently used entries beyond ``size``."""

    def __init__(self, size: int = 65536):  # a default: copy/deepcopy rebuild it as cls() (RecBole's FLOPs count)
        super().__init__()
        self.size = size

    def lookup(self, key):
        value = self.get(key)
        if value is not None:
            self.move_to_end(key)
        return value

    def put(self, key, value):
        self[key] = value
        if len(self) > self.size:
            self.popitem(last=False)


class PromptTokenizer:
    """Turns rendered prompts into model inputs.

    A prompt marks each image with one ``<|image_pad|>`` (see ``prompts.image_placeholder``); after
    tokenisation each is expanded to ``tokens_per_image`` copies, which is cheaper than tokenising
    hundreds of pad tokens per 10-image history.

    Item texts and item prompts come back every epoch and every evaluation: their truncations and
    token ids are kept in bounded LRU caches (``cache=True``), so that tokenising, which costs about
    as much CPU time as the GPU spends on a cached-vision forward, is done once per item.
    """

    CACHE_SIZE = 65536

    def __init__(self, tokenizer, model_config, tokens_per_image: int, merged_side: int):
        self.tokenizer = tokenizer
        # The Rust tokenizer behind a fast tokenizer: called directly it skips transformers' per-call overhead.
        self._backend = getattr(tokenizer, "backend_tokenizer", None)
        self.image_token_id = int(model_config.image_token_id)
        self.tokens_per_image = tokens_per_image
        self.merged_side = merged_side
        to_token = tokenizer.convert_ids_to_tokens
        self.image_pad = to_token(self.image_token_id)
        self.vision_start = to_token(int(model_config.vision_start_token_id))
        self.vision_end = to_token(int(model_config.vision_end_token_id))
        pad = tokenizer.pad_token_id
        if pad is None:  # Qwen tokenizers define <|endoftext|> as pad; fall back to the config's
            pad = getattr(model_config, "pad_token_id", None) or getattr(model_config.get_text_config(), "pad_token_id", None)
        self.pad_id = int(pad or 0)
        # Special-token strings inside item text would be parsed as control tokens (an "<|image_pad|>" in a
        # title would break the image-token count): they are removed from user text.
        specials = sorted(set(tokenizer.all_special_tokens) | set(getattr(tokenizer, "added_tokens_encoder", {})),
                          key=len, reverse=True)
        specials = [s for s in specials if s]
        self._special_re = re.compile("|".join(re.escape(s) for s in specials)) if specials else None
        self._truncated = _LRU(self.CACHE_SIZE)
        self._ids = _LRU(self.CACHE_SIZE)

    def image_placeholder(self) -> str:
        return f"{self.vision_start}{self.image_pad}{self.vision_end}"

    def sanitize(self, text) -> str:
        text = "" if text is None else str(text)
        return self._special_re.sub("", text) if self._special_re is not None else text

    def truncate(self, texts: Sequence[str], max_tokens: int) -> List[str]:
        """Sanitise and cut each text at the end of its ``max_tokens``-th token (by character offsets)."""
        out = [self._truncated.lookup((t, max_tokens)) for t in texts]
        todo = [i for i, t in enumerate(out) if t is None]
        if not todo:
            return out
        clean = [self.sanitize(texts[i]) for i in todo]
        # A byte-level BPE token covers at least one UTF-8 byte: shorter texts need no tokenising here.
        long_idx = [j for j, t in enumerate(clean) if len(t.encode("utf-8")) > max_tokens]
        if long_idx:
            for j, offsets in zip(long_idx, self._offsets([clean[j] for j in long_idx])):
                if len(offsets) > max_tokens:
                    clean[j] = clean[j][: offsets[max_tokens - 1][1]]
        for i, t in zip(todo, clean):
            out[i] = t
            if texts[i] is not None:
                self._truncated.put((texts[i], max_tokens), t)
        return out

    def encode(self, prompts: Sequence[str], cache: bool = False) -> List[np.ndarray]:
        """Token ids of each prompt, every image placeholder expanded to ``tokens_per_image`` image tokens.

        ``cache=True`` for prompts that recur (item prompts); a user's history prompt rarely does.
        """
        out = [self._ids.lookup(p) for p in prompts] if cache else [None] * len(prompts)
        todo = [i for i, r in enumerate(out) if r is None]
        if todo:
            unique = list(dict.fromkeys(prompts[i] for i in todo))
            rows = {}
            for prompt, ids in zip(unique, self._ids_of(unique)):
                row = np.asarray(ids, dtype=np.int64)
                is_img = row == self.image_token_id
                if is_img.any():
                    row = np.repeat(row, np.where(is_img, self.tokens_per_image, 1))
                rows[prompt] = row
                if cache:
                    self._ids.put(prompt, row)
            for i in todo:
                out[i] = rows[prompts[i]]
        return out

    def _ids_of(self, texts: List[str]) -> List[List[int]]:
        if self._backend is not None:
            encode = getattr(self._backend, "encode_batch_fast", self._backend.encode_batch)  # _fast: no offsets
            return [e.ids for e in encode(texts, add_special_tokens=False)]
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]

    def _offsets(self, texts: List[str]) -> List[List[tuple]]:
        if self._backend is not None:
            return [e.offsets for e in self._backend.encode_batch(texts, add_special_tokens=False)]
        return self.tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]

    def batch(self, rows: Sequence[np.ndarray]) -> TokenBatch:
        """Left-pad rows into one batch (the last column is every row's last real token) and add positions."""
        length = max(len(r) for r in rows)
        ids = np.full((len(rows), length), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(rows), length), dtype=np.int64)
        for i, r in enumerate(rows):
            ids[i, length - len(r):] = r
            mask[i, length - len(r):] = 1
        padded = any(len(r) != length for r in rows)
        ids, mask = torch.from_numpy(ids), torch.from_numpy(mask)
        positions = rope_positions(ids, mask, self.image_token_id, self.tokens_per_image, self.merged_side)
        n_images = int((ids == self.image_token_id).sum()) // self.tokens_per_image
        return TokenBatch(ids, mask, positions, n_images, padded)


def rope_positions(input_ids: torch.Tensor, attention_mask: torch.Tensor, image_token_id: int,
                   tokens_per_image: int, merged_side: int) -> torch.Tensor:
    """Qwen-VL multimodal rotary positions ``[3, B, L]`` (temporal, height, width) for square still images.

    Same values as the models' ``get_rope_index`` for images (the tests check all three families), but
    vectorised: that function loops over rows in Python, which costs as much as the forward of a small
    batch. Text tokens advance all three rows by 1 from the first real token (padding ignored); the k-th
    token of an image that starts at position s gets (s, s + k // side, s + k % side); the text after
    the image continues at s + side. Padded positions are 0.
    """
    valid = attention_mask.bool()
    is_img = (input_ids == image_token_id) & valid
    img_count = torch.cumsum(is_img.long(), dim=1)
    k = torch.where(is_img, (img_count - 1) % tokens_per_image, torch.zeros_like(img_count))
    last_of_image = is_img & (k == tokens_per_image - 1)
    advance = torch.where(is_img, torch.zeros_like(k), valid.long())
    advance = advance + last_of_image.long() * merged_side
    start = torch.cumsum(advance, dim=1) - advance
    h = torch.where(is_img, start + k // merged_side, start)
    w = torch.where(is_img, start + k % merged_side, start)
    pos = torch.stack([start, h, w]) * valid.long()
    return pos
