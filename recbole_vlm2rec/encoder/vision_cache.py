"""Frozen-vision cache: each image's merged visual tokens, computed once, memory-mapped from disk.

With the vision tower frozen (the default: LoRA on the language model only) an image's visual tokens
never change, and computing them is most of the cost of an image prompt (docs/design.md#anchors-h200). The
encoder computes them once in batches, stores them here in bf16/fp16, and splices them into the
language model's input embeddings.

Layout of one cache (a directory named after its key)::

    <root>/<fingerprint[:16]>-<image_size>px-<dtype>/
        meta.json    the full key: backbone fingerprint, image size, dtype, shapes
        tokens.bin   rows of [layers, tokens_per_image, hidden] values (layers = 1 + Qwen3-VL deepstack levels)
        index.jsonl  one [image key, row] line per image, append-only

The backbone fingerprint (``backbone.vision_fingerprint``) covers the vision config, weights, image
settings and compute dtype, so another backbone, image size or dtype opens a different cache, built
from scratch. An image's key includes its file size and mtime, so an edited image file is recomputed.
A directory whose ``meta.json`` does not match its key, or whose files are inconsistent, is rebuilt.

Writers take an exclusive ``flock`` on ``lock`` (POSIX), so data-parallel ranks may share a cache; the
sharded warm-up (``VLMEncoder.warm_vision_cache(shard=True)``) writes from rank 0 only.
Disk use per image: layers x tokens_per_image x hidden x bytes (Qwen2-VL-2B at 224 px, bf16:
64 x 1536 x 2 = 196,608 bytes, 1.97 GB per 10,000 images).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
from typing import Dict, Sequence

import numpy as np
import torch

try:
    import fcntl
except ImportError:  # Windows: single-process use only
    fcntl = None

logger = logging.getLogger(__name__)

_STORAGE = {  # cache dtype -> (numpy storage dtype, torch dtype)
    "bf16": (np.uint16, torch.bfloat16),  # numpy has no bfloat16: the raw bits are stored
    "fp16": (np.float16, torch.float16),
    "fp32": (np.float32, torch.float32),
}
FORMAT_VERSION = 1


class VisionCache:
    """Append-only, memory-mapped store of ``[layers, tokens_per_image, hidden]`` arrays keyed by image."""

    def __init__(self, root: str, fingerprint: str, image_size: int, tokens_per_image: int, hidden: int,
                 layers: int = 1, dtype: str = "bf16"):
        if dtype not in _STORAGE:
            raise ValueError(f"vision_cache_dtype must be one of {sorted(_STORAGE)}, got {dtype!r}")
        self.meta = dict(format_version=FORMAT_VERSION, fingerprint=fingerprint, image_size=image_size,
                         tokens_per_image=tokens_per_image, hidden=hidden, layers=layers, dtype=dtype)
        self.directory = os.path.join(os.path.abspath(root), f"{fingerprint[:16]}-{image_size}px-{dtype}")
        self.row_shape = (layers, tokens_per_image, hidden)
        self._np_dtype, self.torch_dtype = _STORAGE[dtype]
        self.row_bytes = int(np.prod(self.row_shape)) * np.dtype(self._np_dtype).itemsize
        self._tokens_path = os.path.join(self.directory, "tokens.bin")
        self._index_path = os.path.join(self.directory, "index.jsonl")
        self._index: Dict[str, int] = {}
        self._index_offset = 0  # bytes of index.jsonl already read
        self._mm = None
        self._mm_rows = 0
        self._open()

    # ------------------------------------------------------------------------------------------- public
    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, key: str) -> bool:
        return key in self._index

    @property
    def nbytes(self) -> int:
        """Bytes on disk of the token rows."""
        return os.path.getsize(self._tokens_path) if os.path.exists(self._tokens_path) else 0

    def refresh(self) -> None:
        """Read the index lines other processes appended since the last read."""
        self._refresh_index()

    def lookup(self, keys: Sequence[str]) -> np.ndarray:
        """Row of each key, -1 where absent (re-reads rows other processes appended)."""
        if any(k not in self._index for k in keys):
            self._refresh_index()
        return np.array([self._index.get(k, -1) for k in keys], dtype=np.int64)

    def get(self, rows: np.ndarray, pin_memory: bool = False) -> torch.Tensor:
        """``[len(rows), layers, tokens_per_image, hidden]`` tensor (cache dtype, CPU) for existing rows.

        ``pin_memory`` reads straight into page-locked memory, so that a ``non_blocking`` copy to the GPU
        overlaps with the kernels still running (from pageable memory a large copy waits for them).
        """
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) and rows.min() < 0:
            raise KeyError("VisionCache.get: row -1 requested; look keys up and add missing images first")
        if len(rows) and rows.max() >= self._mm_rows:
            self._map()
        raw_dtype = torch.int16 if self._np_dtype is np.uint16 else self.torch_dtype
        out = torch.empty((len(rows), *self.row_shape), dtype=raw_dtype, pin_memory=pin_memory)
        dest = out.numpy().view(self._np_dtype)
        for i, row in enumerate(rows):  # row by row: several times faster than fancy indexing a memmap
            dest[i] = self._mm[row]
        return out.view(self.torch_dtype)

    def put(self, keys: Sequence[str], values: torch.Tensor) -> np.ndarray:
        """Append ``values [N, layers, T, hidden]`` under ``keys``; keys present already are kept as they are."""
        if tuple(values.shape[1:]) != self.row_shape:
            raise ValueError(f"VisionCache.put: rows of shape {tuple(values.shape[1:])}, cache holds {self.row_shape}")
        values = values.detach().to("cpu", self.torch_dtype).contiguous()
        raw = values.view(torch.int16).numpy().view(np.uint16) if self._np_dtype is np.uint16 else values.numpy()
        with self._locked():
            self._refresh_index()
            new, seen = [], set()
            for i, key in enumerate(keys):
                if key not in self._index and key not in seen:
                    seen.add(key)
                    new.append(i)
            if new:
                start = os.path.getsize(self._tokens_path) // self.row_bytes
                # Data first, index second: a crash in between leaves unreferenced rows, never a dangling index.
                with open(self._tokens_path, "r+b") as f:
                    f.seek(start * self.row_bytes)
                    f.write(np.ascontiguousarray(raw[new]).tobytes())
                    f.flush()
                with open(self._index_path, "a") as f:
                    f.write("".join(json.dumps([keys[i], start + j]) + "\n" for j, i in enumerate(new)))
                self._refresh_index()
        return self.lookup(keys)

    # ------------------------------------------------------------------------------------------ private
    def _open(self) -> None:
        os.makedirs(self.directory, exist_ok=True)
        with self._locked():
            meta_path = os.path.join(self.directory, "meta.json")
            problem = None
            if os.path.exists(meta_path):
                try:
                    with open(meta_path) as f:
                        stored = json.load(f)
                    if stored != self.meta:
                        problem = "it was built for another backbone, image size or dtype"
                except (OSError, ValueError):
                    problem = "its meta.json is unreadable"
            if problem is None and os.path.exists(meta_path):
                try:
                    self._refresh_index()
                    n_rows = os.path.getsize(self._tokens_path) // self.row_bytes
                    if self._index and max(self._index.values()) >= n_rows:
                        problem = "its index points past the end of tokens.bin"
                except (OSError, ValueError) as err:
                    problem = f"its files are inconsistent ({err})"
            if problem or not os.path.exists(meta_path):
                if problem:
                    logger.warning("Vision cache %s: %s; rebuilding it.", self.directory, problem)
                for name in ("tokens.bin", "index.jsonl", "meta.json"):
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(os.path.join(self.directory, name))
                self._index, self._index_offset = {}, 0
                open(self._tokens_path, "wb").close()
                open(self._index_path, "w").close()
                tmp = meta_path + ".tmp"
                with open(tmp, "w") as f:
                    json.dump(self.meta, f, indent=1)
                os.replace(tmp, meta_path)

    def _refresh_index(self) -> None:
        if not os.path.exists(self._index_path):
            return
        with open(self._index_path, "rb") as f:
            f.seek(self._index_offset)
            chunk = f.read()
        complete = chunk[: chunk.rfind(b"\n") + 1]  # a line being written by another process is read next time
        for line in complete.decode("utf-8").splitlines():
            if line:
                key, row = json.loads(line)
                self._index[key] = int(row)
        self._index_offset += len(complete)

    def _map(self) -> None:
        n_rows = os.path.getsize(self._tokens_path) // self.row_bytes
        self._mm = np.memmap(self._tokens_path, dtype=self._np_dtype, mode="r", shape=(n_rows, *self.row_shape)) \
            if n_rows else None
        self._mm_rows = n_rows

    @contextlib.contextmanager
    def _locked(self):
        if fcntl is None:
            yield
            return
        with open(os.path.join(self.directory, "lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
