"""`VLMEncoder`: a Qwen-VL backbone turned into an item and user embedder (VLM2Rec, docs/design.md#encoder).

An embedding is the final hidden state of a prompt's last real token (prompts are left-padded, so that
is the last column), L2-normalised. External fusion encodes text and image with separate prompts
(:meth:`VLMEncoder.encode_items`, :meth:`VLMEncoder.encode_users`); internal fusion puts both in one
interleaved prompt (:meth:`VLMEncoder.encode_interleaved_items`, :meth:`VLMEncoder.encode_interleaved_users`).

How a prompt with images is run: the visual tokens of its images come from the vision cache (or, when
the cache is off or the vision tower trains, from ``get_image_features``); they replace the image-pad
positions of the token embeddings (``masked_scatter``); the multimodal rotary positions come from
``inputs.rope_positions``; and the language model runs on these ``inputs_embeds``. That is what the
transformers forward does inside, so both give the same embeddings (tests check it per family).

Why one module of ~580 lines: it is one class whose parts share its state (backbone, prompt tokenizer,
image preprocessor, vision cache, image statistics); the stateless pieces live beside it (``catalog.py``,
``inputs.py``, ``prompts.py``, ``vision_cache.py``, ``lora.py``, ``buckets.py``).
"""
from __future__ import annotations

import contextlib
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from . import lora as lora_utils
from recbole_vlm2rec.cross_device import world_size
from recbole_vlm2rec.fusion import fuse

from .buckets import length_buckets, visual_token_index
from .catalog import catalog_digest, check_catalog, encode_in_length_order
from .backbone import Backbone, image_features, transformers_major, vision_fingerprint
from .loading import load_backbone
from .config import EncoderConfig
from .inputs import ImagePreprocessor, PromptTokenizer, TokenBatch, image_key, open_image
from .prompts import PromptBuilder
from .vision_cache import VisionCache

logger = logging.getLogger(__name__)


@dataclass
class ModalityEmbeddings:
    """Per-modality embeddings of a batch: L2-normalised rows; a modality's row is zero where its mask is False
    (an item with an empty text, an item or a user history without a usable image)."""

    text: torch.Tensor  # [B, D] float32
    image: torch.Tensor  # [B, D] float32
    image_mask: torch.Tensor  # [B] bool, True where the row has at least one usable image
    text_mask: torch.Tensor  # [B] bool, True where the row has some text

    def fused(self) -> torch.Tensor:
        """The external-fusion embedding (:func:`recbole_vlm2rec.fusion.fuse`)."""
        return fuse(self.text, self.image, self.image_mask, self.text_mask)


class VLMEncoder(torch.nn.Module):
    """Multimodal item/user embedder on a Qwen2-VL / Qwen2.5-VL / Qwen3-VL backbone.

    Args:
        config: the :class:`EncoderConfig`.
        cache_dir: directory under which the vision cache goes when ``config.vision_cache_dir`` is None
            (the model passes its dataset or checkpoint directory); with neither, ``./saved``.
        backbone: an already loaded :class:`~recbole_vlm2rec.encoder.backbone.Backbone` (benchmarks, tests);
            by default it is loaded from ``config.vlm_name_or_path``.
        device: where to load the weights (default CPU; move the module with ``.to()`` as usual).

    Every ``encode_*`` method is differentiable when the encoder trains (LoRA or full) and works under
    ``torch.autocast``. Items or users without a usable image get ``image_mask`` False and a zero image
    row; unusable images are counted in :attr:`image_stats` and logged once each.
    """

    def __init__(self, config: EncoderConfig, cache_dir: Optional[str] = None, *,
                 backbone: Optional[Backbone] = None, device=None):
        super().__init__()
        if not isinstance(config, EncoderConfig):
            config = EncoderConfig.from_dict(config)
        self.config = config
        backbone = backbone or load_backbone(config, device)
        self.family = backbone.family
        self.name_or_path = backbone.name_or_path
        self.processor = backbone.processor
        self.image_preprocessor = ImagePreprocessor(self.processor, config.image_size)
        self.prompt_tokenizer = PromptTokenizer(self.processor.tokenizer, backbone.model.config,
                                      self.image_preprocessor.tokens_per_image, self.image_preprocessor.merged_side)
        self.prompts = PromptBuilder(self.prompt_tokenizer.image_placeholder(), config.prompt_templates)
        base = backbone.model.model
        self.vlm = lora_utils.setup_trainable(backbone.model, base, config)
        self.adapter_source: Optional[str] = None  # directory of the last loaded adapter
        # Unusable images seen so far: missing / unreadable files (distinct), no_image (entries None or "").
        self.image_stats = {"missing": 0, "unreadable": 0, "no_image": 0}
        # Prompt tokens run so far: real ones, and computed ones (real + left padding; see length_buckets).
        self.token_stats = {"real": 0, "computed": 0}
        self._reported_images = set()
        self._counting_unusable = True  # off while a chunked step re-encodes a batch (recomputing)
        self._cache_root = config.vision_cache_dir or os.path.join(cache_dir or "saved", "vision_cache")
        self._vision_cache: Optional[VisionCache] = None
        self._weight_changes = 0  # bumped whenever weights may change outside an optimizer step
        self._catalog_cache = None  # (key, result) of encode_catalog: the only cache of item embeddings
        self.register_load_state_dict_post_hook(_after_load_state_dict)
        self._mask_optional = transformers_major() >= 5
        self.eval()  # like from_pretrained; the caller's model.train() switches dropout and checkpointing on

    # ------------------------------------------------------------------------------------- properties
    @property
    def base_model(self) -> torch.nn.Module:
        """The inner ``...Model`` (``.visual``, ``.language_model``), under any peft wrapping."""
        model = self.vlm.get_base_model() if lora_utils.is_peft(self.vlm) else self.vlm
        return model.model

    @property
    def hidden_size(self) -> int:
        return int(self.base_model.config.get_text_config().hidden_size)

    @property
    def device(self) -> torch.device:
        return next(self.vlm.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return self.base_model.language_model.get_input_embeddings().weight.dtype

    @property
    def uses_vision_cache(self) -> bool:
        """The cache is used when enabled and the vision tower does not train."""
        return self.config.vision_cache and not self.config.vision_trainable

    @property
    def vision_cache(self) -> VisionCache:
        """The vision cache of the current backbone weights and image settings (opened on first use)."""
        if self._vision_cache is None:
            base = self.base_model
            deepstack = len(getattr(base.visual.config, "deepstack_visual_indexes", None) or ())
            self._vision_cache = VisionCache(
                self._cache_root, vision_fingerprint(base, self.processor, self.config.image_size, self.family),
                self.config.image_size, self.image_preprocessor.tokens_per_image, self.hidden_size, 1 + deepstack,
                self.config.vision_cache_dtype,
            )
        return self._vision_cache

    def weights_version(self) -> tuple:
        """Changes whenever the weights may have changed: every optimizer step (in-place updates bump the
        trainable tensors' version counters), every ``load_state_dict``, ``train()``, adapter load or merge."""
        return (self._weight_changes, sum(p._version for p in self.vlm.parameters() if p.requires_grad))

    def train(self, mode: bool = True):
        if mode:  # weights are about to change: embeddings computed so far are stale
            self._weights_changed(vision=False)
        return super().train(mode)

    def describe(self) -> dict:
        """What produced these embeddings (for export sidecars and logs)."""
        return dict(backbone=self.name_or_path, family=self.family, adapter=self.adapter_source,
                    finetune=self.config.finetune, dim=self.hidden_size, pooling="last_token",
                    normalization="l2", image_size=self.config.image_size, dtype=str(self.dtype).replace("torch.", ""))

    # ----------------------------------------------------------------------------------------- public
    def encode_items(self, texts: Sequence[str], images: Sequence) -> ModalityEmbeddings:
        """Text branch from the ``item_text`` prompt, image branch from the ``item_image`` prompt."""
        _same_length("encode_items", texts, images)
        texts = self.prompt_tokenizer.truncate(texts, self.config.max_text_tokens)
        # An item without text has no text embedding (masked, zero row), not the embedding of an empty prompt.
        text_rows = [i for i, t in enumerate(texts) if _has_text(t)]
        text = self._encode([self.prompts.item_text(texts[i]) for i in text_rows], cache=True) if text_rows else None
        usable, visual = self._visual(list(images))
        rows = [i for i, ok in enumerate(usable) if ok]
        image = self._encode([self.prompts.item_image()] * len(rows), visual, cache=True) if rows else None
        return self._modalities(text, text_rows, image, rows, len(texts))

    def encode_users(self, history_texts: Sequence[Sequence[str]], history_images: Sequence[Sequence]) -> ModalityEmbeddings:
        """Text branch from the ``user_text`` prompt listing the history items' texts; image branch from the
        ``user_image`` prompt with the usable images of the history (a user with none is masked)."""
        _same_length("encode_users", history_texts, history_images)
        text_rows = [u for u, h in enumerate(history_texts) if any(_has_text(t) for t in h)]
        text = self._encode([self.prompts.user_text(self.prompt_tokenizer.truncate(history_texts[u], self.config.max_text_tokens))
                             for u in text_rows]) if text_rows else None
        flat = [img for hist in history_images for img in hist]
        usable, visual = self._visual(flat)
        counts, pos = [], 0
        for hist in history_images:
            counts.append(sum(usable[pos:pos + len(hist)]))
            pos += len(hist)
        rows = [u for u, n in enumerate(counts) if n]
        image = self._encode([self.prompts.user_image(counts[u]) for u in rows], visual) if rows else None
        return self._modalities(text, text_rows, image, rows, len(history_texts))

    def encode_interleaved_items(self, texts: Sequence[str], images: Sequence) -> torch.Tensor:
        """Internal fusion: one ``interleaved_item`` prompt per item (image, if usable, then text) -> ``[B, D]``."""
        _same_length("encode_interleaved_items", texts, images)
        texts = self.prompt_tokenizer.truncate(texts, self.config.max_text_tokens)
        usable, visual = self._visual(list(images))
        return self._encode([self.prompts.interleaved_item(t, ok) for t, ok in zip(texts, usable)], visual, cache=True)

    def encode_interleaved_users(self, history_texts: Sequence[Sequence[str]],
                                 history_images: Sequence[Sequence]) -> torch.Tensor:
        """Internal fusion: one ``interleaved_user`` prompt per user, each history entry image then text -> ``[B, D]``."""
        _same_length("encode_interleaved_users", history_texts, history_images)
        for u, (t, i) in enumerate(zip(history_texts, history_images)):
            if len(t) != len(i):
                raise ValueError(f"encode_interleaved_users: user {u} has {len(t)} texts but {len(i)} images; "
                                 "pass None for a history item without an image")
        usable, visual = self._visual([img for hist in history_images for img in hist])
        prompts, pos = [], 0
        for hist in history_texts:
            texts = self.prompt_tokenizer.truncate(hist, self.config.max_text_tokens)
            prompts.append(self.prompts.interleaved_user(texts, usable[pos:pos + len(hist)]))
            pos += len(hist)
        return self._encode(prompts, visual)

    def encode_catalog(self, item_texts: Sequence[str], item_images: Sequence, batch_size: int = 64,
                       progress: bool = True, fusion: str = "external", cache: bool = True,
                       shard: bool = False) -> Dict[str, torch.Tensor]:
        """Embeddings of a whole catalog, rows in input order, on this encoder's device (see
        :func:`~recbole_vlm2rec.encoder.catalog.encode_in_length_order` for the keys, and for ``shard``:
        under ``torch.distributed`` each process encodes ``1/N`` of it; a collective).

        The result is kept and returned again (the same tensors: do not modify them) while the catalog, the
        fusion and :meth:`weights_version` are unchanged; ``cache=False`` encodes afresh and keeps nothing.
        """
        check_catalog(item_texts, item_images, fusion)
        key = self._catalog_key(item_texts, item_images, fusion)
        if cache and self._catalog_cache is not None and self._catalog_cache[0] == key:
            return dict(self._catalog_cache[1])
        result = encode_in_length_order(self, item_texts, item_images, batch_size, progress, fusion, shard)
        if cache and key[2] == self.weights_version():  # not kept when encoding itself changed the version
            self._catalog_cache = (key, result)
        return dict(result)

    def catalog_is_cached(self, item_texts: Sequence[str], item_images: Sequence, fusion: str = "external") -> bool:
        """Whether :meth:`encode_catalog` would return the kept result without encoding."""
        return self._catalog_cache is not None and self._catalog_cache[0] == self._catalog_key(
            item_texts, item_images, fusion)

    def _catalog_key(self, item_texts, item_images, fusion: str) -> tuple:
        return (catalog_digest(item_texts, item_images), fusion, self.weights_version())

    @torch.no_grad()
    def warm_vision_cache(self, images: Sequence, batch_size: int = 64, progress: bool = True,
                          shard: bool = False) -> dict:
        """Compute and store the visual tokens of every image not cached yet, with a progress bar.

        Call it once per dataset before training: afterwards image prompts cost no vision compute. The
        next batch's images are decoded while the current one runs. Returns counts over ``images``:
        ``images, cached_before, computed, missing, unreadable, no_image`` (entries None or "").

        ``shard``: under ``torch.distributed`` every process calls it with the same ``images`` (a
        collective); process ``r`` of ``N`` computes every ``N``-th distinct image from ``r``, and sends the
        tokens to process 0, the one writer of the cache files, batch by batch; it returns once all shares
        are stored (and visible to every process), with the counts of its own share.
        """
        from tqdm.auto import tqdm

        sharded = shard and world_size() > 1
        if sharded:
            images = list(dict.fromkeys(images))[dist.get_rank()::world_size()]
        stats = dict(images=len(images), cached_before=0, computed=0, missing=0, unreadable=0, no_image=0)
        if not self.uses_vision_cache:  # the same on every process: none of them enters a collective
            logger.info("warm_vision_cache: the vision cache is off (vision_cache false or vision tower trains).")
            return stats
        cache = self.vision_cache
        todo, absent = {}, []
        for img in images:
            key = image_key(img)
            if key is None:
                stats["no_image" if _is_empty(img) else "missing"] += 1
                absent.append(img)
            elif key in cache:
                stats["cached_before"] += 1
            else:
                todo.setdefault(key, img)
        failures = [(img, "missing") for img in absent]
        pending = list(todo.items())
        chunks = [pending[i:i + batch_size] for i in range(0, len(pending), batch_size)]
        rounds = len(chunks)
        if sharded:  # every process takes part in as many rounds as the longest share has batches
            rounds = torch.tensor([rounds], device=self.device)
            dist.all_reduce(rounds, op=dist.ReduceOp.MAX)
            rounds = int(rounds)
        with ThreadPoolExecutor(max_workers=1) as prefetch, \
                tqdm(total=len(pending), desc="vision cache", unit="img", disable=not progress) as bar:
            future = prefetch.submit(self._prepare_images, [img for _, img in chunks[0]]) if chunks else None
            for i in range(rounds):
                keys, values, failed = [], None, []
                if i < len(chunks):
                    prepared = future.result()
                    if i + 1 < len(chunks):
                        future = prefetch.submit(self._prepare_images, [img for _, img in chunks[i + 1]])
                    keys, values, failed = self._vision_rows([k for k, _ in chunks[i]], [img for _, img in chunks[i]],
                                                             prepared)
                if sharded:
                    self._store_on_rank_zero(keys, values)
                elif keys:
                    cache.put(keys, values)
                stats["computed"] += len(keys)
                for _, reason in failed:
                    stats[reason] += 1
                failures += failed
                bar.update(len(chunks[i]) if i < len(chunks) else 0)
        self._report_unusable(failures)
        if sharded:
            dist.barrier()  # process 0 has stored every share
            cache.refresh()
        return stats

    def _store_on_rank_zero(self, keys: list, values: Optional[torch.Tensor]) -> None:
        """Process 0 receives every process's ``(keys, tokens)`` of one warm-up round and writes them (a collective)."""
        cache = self.vision_cache
        mine = (keys, values.to("cpu", cache.torch_dtype) if values is not None else None)
        parts = [None] * world_size() if dist.get_rank() == 0 else None
        dist.gather_object(mine, parts, dst=0)
        for part_keys, part_values in parts or ():
            if part_keys:
                cache.put(part_keys, part_values)

    def save_adapter(self, directory: str) -> None:
        """Write the LoRA adapter on its own (peft format) plus a ``vlm2rec_adapter.json`` naming the backbone."""
        lora_utils.save_adapter(self.vlm, directory, dict(backbone=self.name_or_path, family=self.family,
                                                          encoder_config=self.config.to_dict()))

    def load_adapter(self, directory: str) -> None:
        """Load a LoRA adapter written by :meth:`save_adapter` (trainable if ``finetune`` is lora)."""
        device = self.device
        self.vlm = lora_utils.load_adapter(self.vlm, directory, trainable=self.config.finetune == "lora").to(device)
        if not self.config.vision_trainable:  # an adapter trained with the vision tower stays frozen there
            self.base_model.visual.requires_grad_(False)
        self.vlm.train(self.training)
        self.adapter_source = os.path.abspath(directory)
        self._weights_changed()

    def merge_adapter(self) -> None:
        """Fold the LoRA adapter into the weights (faster inference); the encoder is frozen afterwards."""
        if not lora_utils.is_peft(self.vlm):
            raise ValueError("merge_adapter: this encoder has no LoRA adapter")
        self.vlm = self.vlm.merge_and_unload()
        self.vlm.requires_grad_(False)
        self._weights_changed()

    def save_pretrained(self, directory: str) -> None:
        """Write a plain checkpoint (weights with any adapter merged in, tokenizer, preprocessor config)
        that loads again as ``vlm_name_or_path: <directory>``, here or in transformers."""
        import copy

        os.makedirs(directory, exist_ok=True)
        model = self.vlm
        if lora_utils.is_peft(model):
            # Merging a copy leaves this encoder's adapter (and any optimizer over it) untouched.
            model = copy.deepcopy(model).merge_and_unload()
        model.save_pretrained(directory)
        self.processor.save_pretrained(directory)

    # ---------------------------------------------------------------------------------------- private
    def _weights_changed(self, vision: bool = True) -> None:
        self._weight_changes += 1
        self._catalog_cache = None
        if vision:  # re-fingerprinted on next use: the same cache unless the vision tower changed
            self._vision_cache = None

    def _modalities(self, text, text_rows, image, image_rows, n) -> ModalityEmbeddings:
        """Scatter the encoded rows of each modality into ``[n, D]`` tensors (zero rows where absent)."""
        text, text_mask = self._scatter_rows(text, text_rows, n)
        image, image_mask = self._scatter_rows(image, image_rows, n)
        return ModalityEmbeddings(text=text, image=image, image_mask=image_mask, text_mask=text_mask)

    def _scatter_rows(self, values: Optional[torch.Tensor], rows: list, n: int):
        device = self.device
        if rows and len(rows) == n:  # every row present: nothing to scatter
            return values, torch.ones(n, dtype=torch.bool, device=device)
        mask = torch.zeros(n, dtype=torch.bool, device=device)
        full = torch.zeros(n, self.hidden_size, dtype=torch.float32, device=device)
        if rows:
            # Built on the CPU and copied without blocking: a blocking copy would wait for the GPU queue.
            index = torch.tensor(rows).to(device, non_blocking=True)
            mask[index] = True
            full = full.index_copy(0, index, values)  # differentiable w.r.t. values
        return full, mask

    def _encode(self, prompts: List[str], visual=None, cache: bool = False) -> torch.Tensor:
        """Embeddings of ``prompts`` (rows in order), run as up to ``length_buckets`` forwards of similar lengths."""
        rows = self.prompt_tokenizer.encode(prompts, cache=cache)
        groups = length_buckets([len(r) for r in rows], self.config.length_buckets)
        self._count_tokens(rows, groups)
        if len(groups) == 1:
            return self._forward(self.prompt_tokenizer.batch(rows).to(self.device), visual)
        image_id, per_image = self.prompt_tokenizer.image_token_id, self.image_preprocessor.tokens_per_image
        images_per_row = [int(np.count_nonzero(r == image_id)) // per_image for r in rows]
        parts = []
        for group in groups:
            batch = self.prompt_tokenizer.batch([rows[i] for i in group]).to(self.device)
            parts.append(self._forward(batch, _select_visual(visual, visual_token_index(images_per_row, group, per_image))
                                       if batch.num_images else None))
        # Built on the CPU and copied without blocking (a blocking copy would wait for the GPU queue).
        inverse = torch.from_numpy(np.argsort(np.concatenate(groups))).to(self.device, non_blocking=True)
        return torch.cat(parts).index_select(0, inverse)

    def _count_tokens(self, rows: list, groups: list) -> None:
        """Add this batch's real and computed (real + padding) token counts to :attr:`token_stats`."""
        lengths = np.asarray([len(r) for r in rows])
        self.token_stats["real"] += int(lengths.sum())
        self.token_stats["computed"] += int(sum(len(g) * lengths[g].max() for g in groups))

    def _forward(self, batch: TokenBatch, visual) -> torch.Tensor:
        """Splice visual tokens into the token embeddings, run the language model, pool the last token."""
        lm = self.base_model.language_model
        embeds = lm.get_input_embeddings()(batch.input_ids)
        kwargs = {}
        if batch.num_images:
            tokens, deepstack = visual
            if tokens.shape[0] != batch.num_images * self.image_preprocessor.tokens_per_image:
                raise RuntimeError(f"{batch.num_images} images in the prompts but {tokens.shape[0]} visual tokens")
            image_positions = batch.input_ids == self.prompt_tokenizer.image_token_id
            embeds = embeds.masked_scatter(image_positions.unsqueeze(-1), tokens.to(embeds.dtype))
            if deepstack:  # Qwen3-VL adds features of inner vision layers to the first decoder layers
                kwargs = dict(visual_pos_masks=image_positions,
                              deepstack_visual_embeds=[d.to(embeds.dtype) for d in deepstack])
        # Without padding no mask is needed: SDPA then takes its causal fast path, and transformers does not
        # read the mask back from the GPU to find out (a sync that stalls the CPU). transformers 4.x needs
        # the mask even then: without one it reads the multimodal positions as packed sequences.
        mask = batch.attention_mask if batch.padded or not self._mask_optional else None
        out = lm(inputs_embeds=embeds, attention_mask=mask, position_ids=batch.position_ids, use_cache=False, **kwargs)
        hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state
        return F.normalize(hidden[:, -1].float(), dim=-1)

    def _visual(self, images: list):
        """For a flat list of images: which are usable, and the visual tokens of the usable ones, in order.

        Returns ``(usable: list[bool], (tokens [n*T, D], deepstack [K x [n*T, D]]) or None)``.
        """
        if not images:
            return [], None
        if self.uses_vision_cache:
            keys = [image_key(img) for img in images]
            cache = self.vision_cache
            todo = {}
            for img, key in zip(images, keys):
                if key is not None and key not in cache and key not in todo and key not in self._reported_images:
                    todo[key] = img
            failures = [(img, "missing") for img, k in zip(images, keys) if k is None]
            if todo:
                with torch.no_grad():
                    failures += self._compute_into_cache(list(todo), list(todo.values()))[1]
            usable = [k is not None and k in cache for k in keys]
            self._report_unusable(failures)
            rows = cache.lookup([k for k, ok in zip(keys, usable) if ok])
            if not len(rows):
                return usable, None
            on_gpu = self.device.type == "cuda"
            values = cache.get(rows, pin_memory=on_gpu).to(self.device, non_blocking=True)  # [n, layers, T, D]
            return usable, self._split_layers(values)
        loaded, pixels = self._prepare_images(images)
        usable = [img is not None for img, _ in loaded]
        self._report_unusable([(src, reason) for src, (img, reason) in zip(images, loaded) if img is None])
        if pixels is None:
            return usable, None
        context = torch.enable_grad() if self.config.vision_trainable and torch.is_grad_enabled() else torch.no_grad()
        with context:
            return usable, self._vision_forward(pixels, sum(usable))

    def _split_layers(self, values: torch.Tensor):
        n, layers, t, d = values.shape
        tokens = values[:, 0].reshape(n * t, d)
        return tokens, [values[:, k].reshape(n * t, d) for k in range(1, layers)]

    def _vision_forward(self, pixels: torch.Tensor, n_images: int):
        pixels = pixels.to(self.device, self.dtype, non_blocking=True)
        grid = self.image_preprocessor.grid_thw(n_images).to(self.device, non_blocking=True)
        return image_features(self.base_model, self.family, pixels, grid)

    def _prepare_images(self, images: list):
        """Load images and preprocess the usable ones: ``(loaded [(image|None, reason)], pixels or None)``.

        Pure CPU work (thread-safe), so the vision cache warm-up runs it for the next batch in a thread;
        on a GPU the pixels are page-locked so that their copy does not wait for running kernels.
        """
        loaded = self._load_images(images)
        good = [img for img, _ in loaded if img is not None]
        if not good:
            return loaded, None
        pixels = self.image_preprocessor(good)
        return loaded, pixels.pin_memory() if self.device.type == "cuda" else pixels

    def _load_images(self, images: list) -> list:
        size = self.config.image_size
        if len(images) < 8:
            return [open_image(img, size) for img in images]
        # Decoding and resizing release the GIL: a few threads keep up with a GPU vision tower.
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            return list(pool.map(lambda img: open_image(img, size), images))

    def _compute_into_cache(self, keys: list, images: list):
        """Run the vision tower on the images (eval mode) and store them. Returns ``(number stored,
        [(image, reason)] not loaded)``."""
        good, values, failures = self._vision_rows(keys, images)
        if good:
            self.vision_cache.put(good, values)
        return len(good), failures

    def _vision_rows(self, keys: list, images: list, prepared: Optional[tuple] = None):
        """The cache rows of the loadable images, computed by the vision tower in eval mode; ``prepared`` is
        ``_prepare_images(images)`` when already done. Returns ``(keys of the loaded images, values
        [n, layers, T, D] or None, [(image, reason)] not loaded)``."""
        loaded, pixels = self._prepare_images(images) if prepared is None else prepared
        failures = [(src, reason) for src, (img, reason) in zip(images, loaded) if img is None]
        good = [k for k, (img, _) in zip(keys, loaded) if img is not None]
        if not good:
            return good, None, failures
        was_training = self.base_model.visual.training
        self.base_model.visual.eval()
        tokens, deepstack = self._vision_forward(pixels, len(good))
        self.base_model.visual.train(was_training)
        n, t = len(good), self.image_preprocessor.tokens_per_image
        values = torch.stack([tokens.reshape(n, t, -1)] + [d.reshape(n, t, -1) for d in deepstack], dim=1)
        return good, values, failures

    @contextlib.contextmanager
    def recomputing(self):
        """Inputs encoded again (a chunked contrastive step, ``recbole_vlm2rec.grad_cache``): their unusable
        images were counted and reported the first time."""
        self._counting_unusable = False
        try:
            yield
        finally:
            self._counting_unusable = True

    def _report_unusable(self, failures: list) -> None:
        """Count unusable images and log them without flooding the log during training.

        Entries given as None or "" (items without an image) are counted per occurrence under ``no_image``
        and announced once. Missing and unreadable files are counted and warned about once per file;
        unreadable ones are remembered so that they are not decoded again on every batch.
        """
        if not self._counting_unusable:
            return
        new = []
        for src, reason in failures:
            if _is_empty(src):
                if not self.image_stats["no_image"]:
                    logger.info("Items without an image are encoded from text only (image_mask False).")
                self.image_stats["no_image"] += 1
                continue
            key = image_key(src) or f"missing:{src}"
            if key in self._reported_images:
                continue
            self._reported_images.add(key)
            self.image_stats[reason] += 1
            new.append((src, reason))
        if new:
            examples = ", ".join(f"{_describe(s)} ({r})" for s, r in new[:3])
            logger.warning("%d image file(s) unusable, their image branch is masked: %s%s. Totals so far: %s.",
                           len(new), examples, " ..." if len(new) > 3 else "", self.image_stats)


def _select_visual(visual, index: np.ndarray):
    """The visual tokens (and deepstack features) at ``index`` of a batch's ``(tokens, deepstack)``."""
    tokens, deepstack = visual
    index = torch.from_numpy(index).to(tokens.device, non_blocking=True)
    return tokens.index_select(0, index), [d.index_select(0, index) for d in deepstack]


def _after_load_state_dict(encoder: "VLMEncoder", incompatible_keys) -> None:
    """Every ``load_state_dict`` reaching the encoder (directly or through its parent model) may change weights."""
    encoder._weights_changed()


def _has_text(text) -> bool:
    return bool(text and str(text).strip())


def _is_empty(src) -> bool:
    return src is None or (isinstance(src, str) and not src.strip())


def _describe(src) -> str:
    return repr(str(src))


def _same_length(where, a, b):
    if len(a) != len(b):
        raise ValueError(f"{where}: {len(a)} texts but {len(b)} images; pass None where an item has no image")
