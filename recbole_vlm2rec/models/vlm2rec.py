"""VLM2Rec: a vision-language model fine-tuned into a multimodal user and item embedder (arXiv 2603.17450).

A user is the last ``max_history_items`` items of their sequence, an item is its text and image; both are
encoded by the same VLM (``recbole_vlm2rec.encoder``). With external fusion (the default) text and image are
prompted separately and the two L2-normalised embeddings are summed and normalised again; with internal
fusion one interleaved prompt gives one embedding. Training is in-batch contrastive: each row's next item is
its positive, the other rows' next items its negatives (docs/design.md#objective):

    L = L_WPCL + lambda * L_CRTR        (``calculate_loss`` returns both terms; RecBole logs each)

``beta: 0`` and ``lambda: 0`` give plain contrastive fine-tuning, the baseline that collapses one modality.

Evaluation scores users against the catalog embeddings, computed once per evaluation (the encoder keeps
them until its weights change: any optimizer step, ``load_state_dict`` or ``train()``). The ``score_mode``
argument of ``predict`` / ``full_sort_predict`` picks fused (default), text-only or image-only scores: the
modality-dropout test that exposes collapse (``VLM2RecTrainer`` runs it).

Under ``run_recbole --nproc=N`` each process encodes its share of a step's pairs and, with
``cross_device_negatives`` (the default there), the loss is computed on the rows of all processes
(``recbole_vlm2rec/cross_device.py``): the same loss and gradients as one process with the whole batch.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
from logging import getLogger
from typing import Dict, List, Optional

import torch
from recbole.model.abstract_recommender import SequentialRecommender
from recbole.utils import InputType

from recbole_vlm2rec.checks import choice
from recbole_vlm2rec.cross_device import cross_device_negatives, gather_rows, world_size
from recbole_vlm2rec.diagnostics import ModalityDiagnostics
from recbole_vlm2rec.errors import ConfigError
from recbole_vlm2rec.fusion import MODALITIES
from recbole_vlm2rec.grad_cache import GradCache
from recbole_vlm2rec.losses import InfoNCELoss, VLM2RecObjective

FUSIONS = ("external", "internal")
SCORE_MODES = ("fused",) + MODALITIES  # what predict / full_sort_predict score with (modality dropout)


def _gathered(embeddings):
    """A batch's embeddings (a tensor, or per-modality :class:`ModalityEmbeddings`) from every process."""
    if isinstance(embeddings, torch.Tensor):
        return gather_rows(embeddings)
    return dataclasses.replace(embeddings, **{f.name: gather_rows(getattr(embeddings, f.name))
                                              for f in dataclasses.fields(embeddings)})


class VLM2Rec(SequentialRecommender):
    input_type = InputType.POINTWISE
    exports = ("item_embeddings",)  # VLM2RecTrainer writes them after fit (registry.model_outputs)

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self.logger = getLogger()
        self.max_history_items = int(config["max_history_items"])
        if self.max_history_items < 1:
            raise ConfigError(f"max_history_items must be >= 1, got {self.max_history_items}")
        try:
            self.fusion = choice("fusion", config["fusion"], FUSIONS)
        except ValueError as error:
            raise ConfigError(str(error)) from None
        self.lambda_ = float(config["lambda"])
        self.item_encode_batch_size = int(config["item_encode_batch_size"])
        self.user_encode_batch_size = int(config["user_encode_batch_size"])
        self.grad_norm_diagnostics = bool(config["grad_norm_diagnostics"])
        self.show_progress = bool(config["show_progress"])
        self.checkpoint_trainable_only = bool(config["checkpoint_trainable_only"])
        self.dataset_name = config["dataset"]
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config["amp_dtype"])
        self.enable_amp = bool(config["enable_amp"]) and config["device"].type == "cuda"

        self._read_item_content(config, dataset)

        # The encoder package (transformers, peft) is imported when a VLM2Rec is built, not when the plugin
        # is: registering the models, or VLM2RecSASRec on exported features, never loads it.
        from recbole_vlm2rec.encoder import EncoderConfig, VLMEncoder

        try:  # their checks raise ValueError; for a config key that is the user's to fix (exit 1, no traceback)
            encoder_config = EncoderConfig.from_dict(config.final_config_dict)
            self.objective = VLM2RecObjective.from_settings(config, crtr_weight=self.lambda_)
            self.interleaved_loss = InfoNCELoss(config["tau"])
        except ValueError as error:
            raise error if isinstance(error, ConfigError) else ConfigError(f"VLM2Rec settings: {error}") from None
        self.encoder = VLMEncoder(encoder_config, cache_dir=config["checkpoint_dir"])
        self.encoder.to(config["device"])
        self.diagnostics = ModalityDiagnostics()
        self.cross_device_negatives = cross_device_negatives(config, "VLM2Rec")
        self.contrastive_chunk_size = config["contrastive_chunk_size"]  # checked in settings: ~ or an int >= 1
        if self.use_image and self.encoder.uses_vision_cache:
            stats = self.encoder.warm_vision_cache(
                [p for p in self.item_images if p], batch_size=self.item_encode_batch_size,
                progress=config["show_progress"], shard=True,
            )
            self.logger.info(f"VLM2Rec vision cache: {stats}")
        elif self.use_image:
            reason = ("the vision tower trains (train_vision_tower: True), so its outputs change every step"
                      if self.encoder.config.vision_trainable else "vision_cache: False")
            self.logger.info(f"VLM2Rec vision cache: off, {reason}; every image prompt runs the vision tower")

    def _read_item_content(self, config, dataset) -> None:
        """Item texts and images (row i = RecBole's internal item id i; row 0 is padding), blanked for a
        modality that is not used: the encoder then masks it (zero rows), so no other code needs to know."""
        self.item_texts: List[str] = list(dataset.item_texts)
        self.item_images: List[Optional[str]] = list(dataset.item_images)
        requested = config["modalities"] or list(MODALITIES)
        if isinstance(requested, str):  # --modalities=text on the command line
            requested = [requested]
        requested = list(requested)
        unknown = [m for m in requested if m not in MODALITIES]
        if unknown or not requested:
            raise ConfigError(f"modalities: {requested!r}; choose one or both of {list(MODALITIES)}")
        self.use_text = "text" in requested and dataset.has_text
        self.use_image = "image" in requested and dataset.has_images
        for modality, present in (("text", dataset.has_text), ("image", dataset.has_images)):
            if modality in requested and not present:
                self.logger.warning(f"VLM2Rec: no item of {dataset.dataset_name} has {modality}: training without it")
        if not (self.use_text or self.use_image):
            raise ConfigError(f"modalities: {requested!r}, but the dataset has none of them")
        if not self.use_image:
            self.item_images = [None] * len(self.item_images)
        if not self.use_text:
            self.item_texts = [""] * len(self.item_texts)
        if self.use_text != self.use_image:
            self.logger.info(
                f"VLM2Rec: one modality ({'text' if self.use_text else 'image'}): the loss is plain InfoNCE on it; "
                "WPCL's penalty and CRTR compare text with image, so they are off (beta and lambda have no effect)"
            )

    # ------------------------------------------------------------------------------------------ inputs
    def _histories(self, item_seq: torch.Tensor, item_seq_len: torch.Tensor):
        """The last ``max_history_items`` items of each row (RecBole left-aligns sequences)."""
        rows = item_seq.tolist()
        lengths = item_seq_len.tolist()
        histories = []
        for row, length in zip(rows, lengths):
            histories.append(row[max(0, length - self.max_history_items) : length])
        return histories

    def _autocast(self):
        if self.enable_amp and self.amp_dtype is not None:
            return torch.autocast(device_type="cuda", dtype=self.amp_dtype)
        return contextlib.nullcontext()

    def _encode_users(self, item_seq: torch.Tensor, item_seq_len: torch.Tensor):
        histories = self._histories(item_seq, item_seq_len)
        texts = [[self.item_texts[i] for i in h] for h in histories]
        images = [[self.item_images[i] for i in h] for h in histories]
        with self._autocast():
            if self.fusion == "internal":
                return self.encoder.encode_interleaved_users(texts, images)
            return self.encoder.encode_users(texts, images)

    def _encode_items(self, item_ids: torch.Tensor):
        ids = item_ids.tolist()
        texts = [self.item_texts[i] for i in ids]
        images = [self.item_images[i] for i in ids]
        with self._autocast():
            if self.fusion == "internal":
                return self.encoder.encode_interleaved_items(texts, images)
            return self.encoder.encode_items(texts, images)

    # ---------------------------------------------------------------------------------------- training
    def calculate_loss(self, interaction):
        item_seq = interaction[self.ITEM_SEQ]
        item_seq_len = interaction[self.ITEM_SEQ_LEN]
        pos_items = interaction[self.POS_ITEM_ID]
        cache = None
        if self.contrastive_chunk_size and self.training and torch.is_grad_enabled():
            # GradCache: leaves now, the encoder's gradient when the loss's backward runs (grad_cache.py)
            cache = GradCache(self.contrastive_chunk_size, self.encoder.parameters(), recomputing=self.encoder.recomputing)
            # the functions are called again in backward: they must keep this process's rows (pos_items is
            # rebound to every process's ids below)
            local_items = pos_items
            users = cache.encode(lambda rows: self._encode_users(item_seq[rows], item_seq_len[rows]), len(local_items))
            items = cache.encode(lambda rows: self._encode_items(local_items[rows]), len(local_items))
        else:
            users = self._encode_users(item_seq, item_seq_len)
            items = self._encode_items(pos_items)
        if self.cross_device_negatives:
            users, items, pos_items = _gathered(users), _gathered(items), gather_rows(pos_items)
        if self.fusion == "internal":
            loss = self.interleaved_loss(users, items, item_ids=pos_items).value
            return cache.losses(loss)[0] if cache else loss

        def side(embeddings, modality):
            return getattr(embeddings, modality) if (self.use_text if modality == "text" else self.use_image) else None

        out = self.objective(
            side(users, "text"),
            side(users, "image"),
            users.image_mask if self.use_image else None,
            side(items, "text"),
            side(items, "image"),
            items.image_mask if self.use_image else None,
            item_ids=pos_items,
            grad_norm_ratio=(
                self.grad_norm_diagnostics and self.training and torch.is_grad_enabled() and self.use_text and self.use_image
            ),
        )
        if self.training:
            self.diagnostics.update(
                loss_text=out.loss_text, loss_image=out.loss_image, weak=out.weak_index, grad_norm_ratio=out.grad_norm_ratio,
                positive_score_ratio=out.positive_score_ratio, accuracy_text=out.accuracy_text,
                accuracy_image=out.accuracy_image,
            )
        if not torch.isfinite(out.wpcl) or not torch.isfinite(out.crtr):
            raise FloatingPointError(
                f"VLM2Rec: non-finite loss (L_WPCL={out.wpcl.item()}, L_CRTR={out.crtr.item()}); "
                "lower learning_rate, raise tau, or use vlm_dtype: fp32 / bf16 instead of fp16"
            )
        losses = (out.wpcl, self.lambda_ * out.crtr)
        return cache.losses(*losses) if cache else losses

    # ------------------------------------------------------------------------------------- checkpoints
    def _frozen_encoder_keys(self, keys) -> set:
        """Backbone entries that do not train (frozen weights, tied copies such as lm_head, buffers)."""
        trainable = {f"encoder.{name}" for name, p in self.encoder.named_parameters() if p.requires_grad}
        return {k for k in keys if k.startswith("encoder.") and k not in trainable}

    def state_dict(self, *args, **kwargs):
        """Without the frozen backbone weights when ``checkpoint_trainable_only`` (the default): they are
        loaded again from ``vlm_name_or_path``, and a 3B backbone would add ~6 GB to every checkpoint."""
        state = super().state_dict(*args, **kwargs)
        if self.checkpoint_trainable_only:
            for key in self._frozen_encoder_keys(list(state)):
                del state[key]
        return state

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        frozen = self._frozen_encoder_keys(list(super().state_dict(keep_vars=True)))
        result = super().load_state_dict(state_dict, strict=False, assign=assign)
        missing = [k for k in result.missing_keys if k not in frozen]
        if strict and (missing or result.unexpected_keys):
            raise RuntimeError(
                f"VLM2Rec checkpoint does not match the model: missing {missing[:5]}, unexpected "
                f"{result.unexpected_keys[:5]}; was it trained with other finetune / lora_* / vlm_name_or_path settings?"
            )
        return result

    # -------------------------------------------------------------------------------------- evaluation
    def catalog_embeddings(self, shard: bool = False) -> Dict[str, torch.Tensor]:
        """Per-modality and fused embeddings of every item (row = internal item id), on the model's device.
        ``shard``: every process of a ``torch.distributed`` run calls it (evaluation) and encodes ``1/N``
        of the catalog; the export, on rank 0 alone, encodes all of it.

        The encoder keeps them while its weights are unchanged (``VLMEncoder.encode_catalog``, the one cache
        of item embeddings): an evaluation encodes the catalog once, and any optimizer step,
        ``load_state_dict`` (e.g. RecBole's reload of the best epoch) or ``train()`` makes it encode again.
        """
        catalog = self.encoder.encode_catalog(
            self.item_texts,
            self.item_images,
            batch_size=self.item_encode_batch_size,
            progress=self.show_progress,
            fusion=self.fusion,
            shard=shard,
        )
        if self.fusion == "internal":
            catalog["fused"] = catalog.pop("interleaved")
        return catalog

    def _user_vectors(self, interaction, score_mode: str) -> torch.Tensor:
        """User vectors scored under ``score_mode``; users are encoded once per distinct history."""
        item_seq = interaction[self.ITEM_SEQ]
        item_seq_len = interaction[self.ITEM_SEQ_LEN]
        # sampled evaluation repeats each user once per candidate item: encode each distinct row once
        unique_rows, inverse = torch.unique(torch.cat([item_seq, item_seq_len.unsqueeze(1)], 1), dim=0, return_inverse=True)
        vectors = []
        for start in range(0, unique_rows.shape[0], self.user_encode_batch_size):
            chunk = unique_rows[start : start + self.user_encode_batch_size]
            vectors.append(self._scored_as(self._encode_users(chunk[:, :-1], chunk[:, -1]), score_mode))
        return torch.cat(vectors)[inverse]

    def _catalog_vectors(self, score_mode: str, shard: bool = False) -> torch.Tensor:
        """Every item's vector scored under ``score_mode`` (row = internal item id)."""
        catalog = self.catalog_embeddings(shard)
        return catalog["fused" if self.fusion == "internal" else score_mode]

    def _scored_as(self, embeddings, score_mode: str) -> torch.Tensor:
        """Encoder output as scored under ``score_mode``: the interleaved vector, one modality, or the fusion."""
        if self.fusion == "internal":
            return embeddings.float()
        if score_mode != "fused":
            return getattr(embeddings, score_mode).float()
        return embeddings.fused()

    @staticmethod
    def _check_score_mode(score_mode: str) -> None:
        if score_mode not in SCORE_MODES:
            raise ValueError(f"score_mode must be one of {list(SCORE_MODES)}, got {score_mode!r}")

    @torch.no_grad()
    def predict(self, interaction, score_mode: str = "fused"):
        """Scores of the (user, item) pairs; ``score_mode`` "text" / "image" scores one modality alone."""
        self._check_score_mode(score_mode)
        users = self._user_vectors(interaction, score_mode)
        item_ids = interaction[self.ITEM_ID]
        unique_items, inverse = torch.unique(item_ids, return_inverse=True)
        few = unique_items.numel() <= self.item_encode_batch_size  # checked first: the cache lookup hashes the catalog
        if few and not self.encoder.catalog_is_cached(self.item_texts, self.item_images, self.fusion):
            # a handful of items (RecBole's FLOPs count, a one-off call): no need to encode the whole catalog
            return (users * self._scored_as(self._encode_items(unique_items), score_mode)[inverse]).sum(-1)
        return (users * self._catalog_vectors(score_mode)[item_ids]).sum(-1)

    @torch.no_grad()
    def full_sort_predict(self, interaction, score_mode: str = "fused"):
        """Scores of every item for each user; ``score_mode`` as in :meth:`predict`."""
        self._check_score_mode(score_mode)
        # every process of a distributed evaluation gets here equally often (RecBole pads their shares of
        # users): they encode the catalog together; predict's calls differ between processes, so it does not
        catalog = self._catalog_vectors(score_mode, shard=world_size() > 1)
        return self._user_vectors(interaction, score_mode) @ catalog.t()

    # --------------------------------------------------------------------------------------- artefacts
    def export(self, directory: str, item_tokens, checkpoint: Optional[str] = None) -> Dict[str, str]:
        """Write the per-modality catalog embeddings (``item_embeddings.<modality>.npy`` + ``.json``) and,
        with LoRA, the adapter (``adapter/``) into ``directory``. Returns what was written. ``checkpoint``
        (the weights' file) is recorded in the sidecars."""
        from recbole_vlm2rec.item_embeddings import export_item_embeddings, export_prefix

        os.makedirs(directory, exist_ok=True)
        catalog = self.catalog_embeddings()
        arrays = {m: catalog[m].float().cpu().numpy() for m in ("text", "image", "fused") if m in catalog}
        # row 0 is RecBole's padding item: it is not an item, leave it out of the export
        tokens = [str(t) for t in item_tokens[1:]]
        arrays = {m: a[1:] for m, a in arrays.items()}
        if not self.use_image:
            arrays.pop("image", None)
        if not self.use_text:
            arrays.pop("text", None)
        written = export_item_embeddings(
            export_prefix(directory),
            tokens,
            arrays,
            metadata=dict(
                self.encoder.describe(),
                dataset=self.dataset_name,
                fusion=self.fusion,
                checkpoint=os.path.abspath(checkpoint) if checkpoint else None,
            ),
        )
        if self.encoder.config.finetune == "lora":
            adapter_dir = os.path.join(directory, "adapter")
            self.encoder.save_adapter(adapter_dir)
            written["adapter"] = adapter_dir
        return written
