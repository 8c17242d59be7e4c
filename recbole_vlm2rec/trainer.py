"""Trainers of our models: RecBole's ``Trainer`` plus per-epoch modality diagnostics, the modality-dropout
evaluation and the export of VLM2Rec's artefacts after training.

``ModalityDiagnosticsTrainer`` works for any model with a ``diagnostics`` attribute (a
``recbole_vlm2rec.diagnostics.ModalityDiagnostics`` that the model updates in ``calculate_loss``): it resets
it when an epoch starts and logs (and writes to TensorBoard) its summary when the epoch ends.
"""
from __future__ import annotations

import math
import os

from recbole.trainer import Trainer
from recbole.utils import set_color

from recbole_vlm2rec.diagnostics import modality_dropout_table


class ModalityDiagnosticsTrainer(Trainer):
    """RecBole's Trainer, logging the model's modality diagnostics (L^T, L^V, weak share, grad ratio) per epoch."""

    def _train_epoch(self, train_data, epoch_idx, loss_func=None, show_progress=False):
        diagnostics = getattr(self.model, "diagnostics", None)
        if diagnostics is not None:
            diagnostics.reset()
        result = super()._train_epoch(train_data, epoch_idx, loss_func=loss_func, show_progress=show_progress)
        if diagnostics is not None:
            summary = diagnostics.summary()
            if summary.get("steps"):
                self.logger.info(set_color(f"epoch {epoch_idx} ", "green") + diagnostics.format_line())
                if getattr(self, "tensorboard", None) is not None:
                    for key, value in summary.items():
                        if key != "steps" and not math.isnan(value):
                            self.tensorboard.add_scalar(f"modality/{key}", value, epoch_idx)
        return result


class VLM2RecTrainer(ModalityDiagnosticsTrainer):
    """Adds to the diagnostics trainer:

    * after ``fit`` (with ``saved``): the best model's item embeddings per modality and its LoRA adapter,
      written to ``<checkpoint_dir>/<checkpoint file stem>/`` (``export_embeddings``);
    * after a final evaluation (not the validation runs inside ``fit``): the same metrics with text-only and
      image-only scores beside the fused ones, logged as a table and kept in ``modality_results``
      (``modality_dropout_eval``).
    """

    def __init__(self, config, model):
        super().__init__(config, model)
        self._fitting = False
        self.modality_results = None
        self.export_paths = None

    def fit(self, train_data, valid_data=None, verbose=True, saved=True, show_progress=False, callback_fn=None):
        self._fitting = True
        try:
            result = super().fit(train_data, valid_data, verbose, saved, show_progress, callback_fn)
        finally:
            self._fitting = False
        # one writer under torch.distributed: rank 0, which also wrote the checkpoint it reloads
        if saved and self.config["export_embeddings"] and self.config["local_rank"] == 0:
            self._export_best(train_data)
        return result

    def _export_best(self, train_data) -> None:
        from recbole_vlm2rec.compat import load_checkpoint

        if os.path.isfile(self.saved_model_file):
            checkpoint = load_checkpoint(self.saved_model_file, map_location=self.device)
            self.model.load_state_dict(checkpoint["state_dict"])
        self.model.eval()
        dataset = train_data._dataset
        directory = os.path.splitext(self.saved_model_file)[0]
        os.makedirs(directory)  # the checkpoint name is unique to this run (compat 6): never another run's folder
        self.export_paths = self.model.export(
            directory, dataset.field2id_token[dataset.iid_field], checkpoint=self.saved_model_file
        )
        self.logger.info(set_color("exported", "blue") + f": {self.export_paths}")

    def evaluate(self, eval_data, load_best_model=True, model_file=None, show_progress=False):
        result = super().evaluate(eval_data, load_best_model, model_file, show_progress)
        model = self.model
        if (
            self._fitting
            or not result
            or not self.config["modality_dropout_eval"]
            or getattr(model, "fusion", "internal") != "external"
            or not (model.use_text and model.use_image)
        ):
            return result
        results = {"fused": dict(result)}
        for mode in ("text", "image"):
            results[f"{mode}-only"] = self._evaluate_scored_as(mode, eval_data, show_progress)
        self.modality_results = results
        self.logger.info(
            set_color("modality dropout (same users, same catalog)", "yellow") + "\n" + modality_dropout_table(results)
        )
        return result

    def _evaluate_scored_as(self, score_mode: str, eval_data, show_progress: bool) -> dict:
        """RecBole's evaluation of the current weights with ``score_mode`` passed to the model's predict and
        full_sort_predict (RecBole's trainer calls them with the interaction alone)."""
        model = self.model
        self.model = _ScoredAs(model, score_mode)
        try:
            return dict(super().evaluate(eval_data, False, None, show_progress))
        finally:
            self.model = model


class _ScoredAs:
    """The model as RecBole's evaluation loop sees it, with ``score_mode`` bound into its scoring methods."""

    def __init__(self, model, score_mode: str):
        self._model, self._score_mode = model, score_mode

    def predict(self, interaction):
        return self._model.predict(interaction, score_mode=self._score_mode)

    def full_sort_predict(self, interaction):
        return self._model.full_sort_predict(interaction, score_mode=self._score_mode)

    def __getattr__(self, name):  # everything else (eval(), device, ...) is the model's
        return getattr(self._model, name)
