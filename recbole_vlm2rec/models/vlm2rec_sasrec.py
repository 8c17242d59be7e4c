"""
VLM2RecSASRec
################################################

A light sequential recommender on per-modality item features, typically VLM2Rec's exported item
embeddings (docs/design.md#vlm2recsasrec): the VLM runs once over the catalog, then this model trains and serves
at SASRec's speed on any catalog size.

    item(i) = ID(i) (optional) + A^T(x^T_i) + A^V(x^V_i)      A^m = Linear + LayerNorm + dropout
    user    = SASRec's transformer encoder over the history's item vectors
    L       = L_rec + alpha * L_WPCL + lambda * L_CRTR

It is RecBole's SASRec (a subclass, as UniSRec is): SASRec's layers, their initialisation and its
``forward`` are used as they are. What it adds is the item table: :meth:`VLM2RecSASRec.item_representations`
builds it from the branches, SASRec's forward reads the history's vectors from it and the scores use it.

``L_rec`` is cross-entropy over all items. ``L_WPCL`` and ``L_CRTR`` are VLM2Rec's own terms
(``recbole_vlm2rec.losses.VLM2RecObjective``) on the modality branches: in-batch, each row's next item is
its positive and the other rows' next items its negatives; the per-modality item vectors are the adapted
branches ``A^m(x^m)`` of the positive items, the user vector is the encoder output, detached (the same for
both modalities: there is one user encoder), so these terms train the branches and ``L_rec`` trains the
encoder. ``calculate_loss`` returns the three terms so that RecBole logs each.

``item_init``:

* ``frozen`` (default): the features stay fixed buffers, the adapters learn;
* ``finetune``: each modality branch becomes a trainable item table, initialised from the features
  (L2-normalised rows, top principal components up to ``hidden_size``), so that at the start the
  item table is, up to the small random ID embedding, the fused VLM embedding in the model's space: the
  paper's "initialisation" of a conventional recommender.

``feature_modalities: ~`` (default) reads every modality the feature prefix has; with one modality (a
text-only catalog) WPCL and CRTR, which compare the two branches, are off and ``L = L_rec``. With no
features (``feature_modalities: []``) and ``use_id_embedding: True`` it is SASRec (CE), exactly.

Features are inputs, like the dataset: they are not stored in checkpoints. The prefix they were read from
is written back into the config (``feature_prefix``), which checkpoints keep, so that reloading reads the
same files.
"""
from __future__ import annotations

import os
from logging import getLogger
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from recbole.model.sequential_recommender.sasrec import SASRec

from recbole_vlm2rec.checks import non_negative
from recbole_vlm2rec.cross_device import cross_device_negatives, gather_rows
from recbole_vlm2rec.data.features import (
    ItemFeatures,
    available_modalities,
    load_item_features,
    modality_list,
    resolve_feature_prefix,
)
from recbole_vlm2rec.diagnostics import ModalityDiagnostics
from recbole_vlm2rec.errors import ConfigError, DataError
from recbole_vlm2rec.fusion import MODALITIES
from recbole_vlm2rec.losses import VLM2RecObjective

ITEM_INITS = ("frozen", "finetune")


def _non_negative(config, key: str) -> float:
    try:
        return non_negative(key, config[key])
    except (TypeError, ValueError) as error:
        raise ConfigError(str(error)) from None


def _principal_components(features: ItemFeatures, size: int) -> torch.Tensor:
    """``[n_items, size]``: the present rows' L2-normalised features projected on their top principal
    components, scaled to unit standard deviation; absent rows and components beyond the data's rank are zero."""
    present = torch.from_numpy(features.present)
    rows = F.normalize(torch.from_numpy(features.array)[present], dim=-1)
    centered = rows - rows.mean(dim=0, keepdim=True)
    rank = min(size, *centered.shape)
    # Randomised (seeded by RecBole's init_seed before the model is built), and fast on [12k, 2048] arrays.
    _, _, components = torch.pca_lowrank(centered, q=rank, center=False, niter=4)
    scores = centered @ components[:, :rank]
    scores = scores / scores.std().clamp_min(1e-12)
    table = torch.zeros(len(features.array), size)
    table[present, :rank] = scores
    return table


class VLM2RecSASRec(SASRec):
    r"""SASRec over frozen (or feature-initialised) per-modality item features, with WPCL and CRTR on the
    modality branches. See the module docstring."""

    consumes = ("item_embeddings",)  # read through feature_prefix (registry.model_inputs)

    def __init__(self, config, dataset):
        super().__init__(config, dataset)  # SASRec's settings, layers and initialisation
        self._read_settings(config)
        features = self._load_features(config, dataset) if self.modalities != [] else {}
        self.modalities = list(features)
        # WPCL and CRTR compare the text and the image branch: with one modality there is nothing to compare
        self.uses_modality_terms = len(self.modalities) == 2
        self.grad_norm_diagnostics = self.grad_norm_diagnostics and self.uses_modality_terms
        # L_rec is per row (over all items); the modality terms are in-batch: gathered across processes
        self.cross_device_negatives = self.uses_modality_terms and cross_device_negatives(config, "VLM2RecSASRec")
        if len(self.modalities) == 1 and (self.alpha or self.lambda_):
            getLogger().info(
                f"VLM2RecSASRec: one feature modality ({self.modalities[0]}): WPCL and CRTR need text and image, "
                f"so they are off (alpha {self.alpha} and lambda {self.lambda_} have no effect); L = L_rec"
            )
        self._build_branches(config, features)
        self._init_branches(features)

    # ------------------------------------------------------------------------------------------ building
    def _read_settings(self, config) -> None:
        """Our keys, checked (SASRec has read its own)."""
        if self.loss_type != "CE":
            raise ConfigError(f"VLM2RecSASRec trains with loss_type: CE (over all items), got {self.loss_type!r}")
        self.modalities = modality_list(config["feature_modalities"], MODALITIES)  # None: what the prefix has
        self.use_id_embedding = bool(config["use_id_embedding"])
        if self.modalities == [] and not self.use_id_embedding:
            raise ConfigError(
                "VLM2RecSASRec has no item representation: feature_modalities is empty and use_id_embedding is "
                "False. List feature_modalities (e.g. [text, image]) or set use_id_embedding: True."
            )
        self.item_init = config["item_init"]
        if self.item_init not in ITEM_INITS:
            raise ConfigError(f"item_init must be one of {list(ITEM_INITS)}, got {self.item_init!r}")
        self.alpha = _non_negative(config, "alpha")
        self.lambda_ = _non_negative(config, "lambda")
        self.adapter_dropout_prob = _non_negative(config, "adapter_dropout")
        if self.adapter_dropout_prob >= 1:
            raise ConfigError(f"adapter_dropout must be in [0, 1), got {self.adapter_dropout_prob!r}")
        self.grad_norm_diagnostics = bool(config["grad_norm_diagnostics"])
        self.diagnostics_every = config["diagnostics_every"]  # checked (an int >= 1) in settings
        self._training_steps = 0
        self.score_temperature = config["score_temperature"]  # None: SASRec's dot product (checked > 0 in settings)

    def _load_features(self, config, dataset) -> Dict[str, ItemFeatures]:
        item_tokens = dataset.field2id_token[self.ITEM_ID]
        wanted = self.modalities or list(MODALITIES)
        prefix = os.path.abspath(
            resolve_feature_prefix(
                config["feature_prefix"], wanted, config["checkpoint_dir"], dataset.dataset_name, item_tokens
            )
        )
        if self.modalities is None:
            wanted = available_modalities(prefix, MODALITIES)
            getLogger().info(f"feature_modalities: ~ -> {wanted} (the modalities {prefix} has)")
        config["feature_modalities"] = wanted  # checkpoints keep the config: a reload reads the same modalities
        features = load_item_features(prefix, wanted, item_tokens, config["missing_item_policy"])
        for modality, feature in features.items():
            if not feature.present.any():
                raise DataError(
                    f"{feature.path}: no item of the dataset has {modality} features (all rows are zero, masked or "
                    f"absent); drop {modality} from feature_modalities"
                )
        config["feature_prefix"] = prefix  # checkpoints keep the config: a reload reads the same files
        self.feature_prefix = prefix
        source = next(iter(features.values())).meta
        getLogger().info(
            f"VLM2RecSASRec item features: {prefix}.{{{','.join(features)}}}.npy"
            + (f" (exported from {source['checkpoint']})" if source.get("checkpoint") else "")
        )
        return features

    def _build_branches(self, config, features: Dict[str, ItemFeatures]) -> None:
        """The modality branches (adapters over fixed features, or trainable tables) and the loss on them."""
        if not self.use_id_embedding:
            # SASRec's forward still embeds the history through item_embedding, which then keeps no table of
            # its own: it is handed item_representations() (see _user_vectors)
            self.item_embedding.weight = None
        self.feature_dims = {m: f.dim for m, f in features.items()}
        for modality, feature in features.items():
            # Presence masks: an item lacking a modality contributes nothing from that branch and is
            # masked in the WPCL/CRTR terms. Derived from the files, so not saved in checkpoints.
            self.register_buffer(f"present_{modality}", torch.from_numpy(feature.present), persistent=False)
        if self.item_init == "frozen":
            for modality, feature in features.items():
                self.register_buffer(f"features_{modality}", torch.from_numpy(feature.array), persistent=False)
            self.adapters = nn.ModuleDict(
                {
                    m: nn.Sequential(
                        nn.Linear(f.dim, self.hidden_size), nn.LayerNorm(self.hidden_size, eps=self.layer_norm_eps)
                    )
                    for m, f in features.items()
                }
            )
        else:
            self.item_tables = nn.ModuleDict({m: nn.Embedding(self.n_items, self.hidden_size) for m in features})
        self.adapter_dropout = nn.Dropout(self.adapter_dropout_prob)
        if len(features) == 2:
            try:
                self.objective = VLM2RecObjective.from_settings(config, crtr_weight=self.lambda_)
            except (TypeError, ValueError) as error:
                raise ConfigError(f"VLM2RecSASRec loss settings: {error}") from None
            if self.objective.relation != "item":
                # There is one user encoder, so the text and image user vectors are the same vector and
                # a user-side relation would compare a distribution with itself (always 0).
                raise ConfigError(
                    f"crtr_relation: {config['crtr_relation']!r} is not available in VLM2RecSASRec, whose users "
                    "have one vector for both modalities; use crtr_relation: item"
                )
            if config["compile_objective"]:
                # torch.compile in place (nn.Module.compile): the objective's ~1,000 small operators become a
                # few fused kernels; compiled once per variant (with and without the gradient-norm ratio).
                self.objective.compile(dynamic=False)
        self.diagnostics = ModalityDiagnostics()

    def _init_branches(self, features: Dict[str, ItemFeatures]) -> None:
        """Adapters get SASRec's initialisation; tables the features' principal components. Either way the
        branches start on the scale of SASRec's item embeddings (std initializer_range), so that the first
        logits are near zero as in SASRec: with unit-scale branches (LayerNorm's default gain) the first CE on
        the test fixture was 4x log(n_items)."""
        with torch.no_grad():
            if self.item_init == "frozen":
                self.adapters.apply(self._init_weights)
                for adapter in self.adapters.values():
                    adapter[1].weight.fill_(self.initializer_range)
            else:
                for modality, feature in features.items():
                    table = _principal_components(feature, self.hidden_size) * self.initializer_range
                    self.item_tables[modality].weight.copy_(table)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        # A checkpoint trained on features of another width would otherwise fail with torch's bare
        # "size mismatch" message; say which features changed.
        if self.item_init == "frozen":
            for modality, dim in self.feature_dims.items():
                weight = state_dict.get(f"adapters.{modality}.0.weight")
                if weight is not None and weight.shape[1] != dim:
                    raise DataError(
                        f"this checkpoint was trained on {modality} features of dimension {weight.shape[1]}, but "
                        f"the features now read (feature_prefix: {self.feature_prefix}) have dimension "
                        f"{dim}; point feature_prefix at the arrays the model was trained on"
                    )
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    # ------------------------------------------------------------------------------------- item vectors
    def branch_tables(self) -> Dict[str, Tensor]:
        """Per modality, ``[n_items, hidden]`` item vectors (zero where the item lacks the modality)."""
        branches = {}
        for modality in self.modalities:
            if self.item_init == "frozen":
                vectors = self.adapters[modality](getattr(self, f"features_{modality}"))
            else:
                vectors = self.item_tables[modality].weight
            present = getattr(self, f"present_{modality}")
            branches[modality] = self.adapter_dropout(vectors) * present.unsqueeze(-1)
        return branches

    def item_representations(self, branches: Optional[Dict[str, Tensor]] = None) -> Tensor:
        """``[n_items, hidden]``: ``ID(i) + sum_m A^m(x^m_i)``, the item vectors the encoder reads and the scores
        use. ``branches``: :meth:`branch_tables`, computed here when not given."""
        parts = list((self.branch_tables() if branches is None else branches).values())
        if self.use_id_embedding:
            parts.insert(0, self.item_embedding.weight)
        return sum(parts[1:], parts[0])

    def _user_vectors(self, interaction, items: Tensor) -> Tensor:
        """``[B, hidden]``: SASRec's forward over the histories, reading their item vectors from ``items``.

        SASRec's forward embeds the history with ``self.item_embedding``; ``functional_call`` runs it with
        ``items`` as that embedding's weight for this one call. So one table serves a whole step: the history
        and the scores see the same vectors (and the same adapter-dropout sample), computed once.
        """
        inputs = (interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN])
        return functional_call(self, {"item_embedding.weight": items}, inputs)

    # ------------------------------------------------------------------------------ loss and scoring
    def calculate_loss(self, interaction):
        pos_items = interaction[self.POS_ITEM_ID]
        branches = self.branch_tables()
        items = self.item_representations(branches)
        user = self._user_vectors(interaction, items)
        rec_loss = self.loss_fct(self._scores(user, items), pos_items)
        if not self.uses_modality_terms:
            zero = rec_loss.new_zeros(())
            return rec_loss, zero, zero
        # The terms act on the modality branches only; the sequence encoder learns from L_rec and the user
        # vector is their fixed query. Letting their gradient into the encoder cost NDCG@10 on the demo
        # (3 epochs, alpha 0.1, lambda 0: 0.108 vs 0.129 detached; 0.147 without the terms), and with
        # wpcl_form: absolute it let WPCL fall to ~0 by turning the weak branch away from every user (0.033).
        wpcl, crtr = self._modality_terms(user.detach(), branches, pos_items)
        return rec_loss, self.alpha * wpcl, self.lambda_ * crtr

    def _modality_terms(self, user: Tensor, branches: Dict[str, Tensor], pos_items: Tensor) -> Tuple[Tensor, Tensor]:
        """(WPCL, CRTR) of the positive items' text and image branch vectors against ``user`` (the same user
        vector for both: there is one user encoder); records the diagnostics. Only called with both branches."""
        text, image, present = branches["text"][pos_items], branches["image"][pos_items], self.present_image[pos_items]
        # The gradient-norm ratio costs an extra autograd pass (~460 operators): a sample of the steps
        grad_norm_ratio = False
        if self.training:
            grad_norm_ratio = self.grad_norm_diagnostics and self._training_steps % self.diagnostics_every == 0
            self._training_steps += 1
        if self.cross_device_negatives:  # the terms are in-batch: on the whole batch of all processes
            user, text, image, present, pos_items = map(gather_rows, (user, text, image, present, pos_items))
        out = self.objective(
            user,
            user,
            None,
            text,
            image,
            present,
            item_ids=pos_items,
            grad_norm_ratio=grad_norm_ratio,
        )
        if self.training:  # the epoch's diagnostics are the training steps' (as the detector's EMA)
            self.diagnostics.update(
                loss_text=out.loss_text, loss_image=out.loss_image, weak=out.weak_index,
                grad_norm_ratio=out.grad_norm_ratio, positive_score_ratio=out.positive_score_ratio,
                accuracy_text=out.accuracy_text, accuracy_image=out.accuracy_image,
            )
        return out.wpcl, out.crtr

    def _scores(self, user: Tensor, items: Tensor, pairwise: bool = False) -> Tensor:
        """The model's one score: ``user . item`` (SASRec's), or with ``score_temperature`` t,
        ``cos(user, item) / t``. ``[B, n]`` of every user against every row of ``items``, or with ``pairwise``
        ``[B]`` of user b against item row b."""
        if self.score_temperature is not None:
            user, items = F.normalize(user, dim=-1), F.normalize(items, dim=-1)
        scores = (user * items).sum(dim=-1) if pairwise else torch.matmul(user, items.transpose(0, 1))
        return scores if self.score_temperature is None else scores / self.score_temperature

    def predict(self, interaction):
        items = self.item_representations()
        user = self._user_vectors(interaction, items)
        return self._scores(user, items[interaction[self.ITEM_ID]], pairwise=True)  # [B]

    def full_sort_predict(self, interaction):
        items = self.item_representations()
        return self._scores(self._user_vectors(interaction, items), items)  # [B n_items]
