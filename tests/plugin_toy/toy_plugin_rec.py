"""A test-only plugin model, registered exactly the way recbole_vlm2rec registers its own models.

``ToyPluginRec`` is a mean-of-history-embeddings sequential recommender with its own dataset and trainer
classes (thin subclasses that record that they were used) and its own default properties file.
"""
from pathlib import Path

import torch
from recbole.data.dataset import SequentialDataset
from recbole.model.abstract_recommender import SequentialRecommender
from recbole.trainer import Trainer

from recbole_vlm2rec.registry import register_model


class ToyPluginRecDataset(SequentialDataset):
    pass


class ToyPluginRecTrainer(Trainer):
    pass


class ToyPluginRec(SequentialRecommender):
    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self.item_embedding = torch.nn.Embedding(self.n_items, config["toy_dim"], padding_idx=0)
        self.loss_fct = torch.nn.CrossEntropyLoss()

    def _user_vector(self, interaction):
        items = interaction[self.ITEM_SEQ]
        mask = (items > 0).float().unsqueeze(-1)
        return (self.item_embedding(items) * mask).sum(1) / mask.sum(1).clamp(min=1.0)

    def calculate_loss(self, interaction):
        logits = self._user_vector(interaction) @ self.item_embedding.weight.t()
        return self.loss_fct(logits, interaction[self.POS_ITEM_ID])

    def predict(self, interaction):
        return (self._user_vector(interaction) * self.item_embedding(interaction[self.ITEM_ID])).sum(-1)

    def full_sort_predict(self, interaction):
        return self._user_vector(interaction) @ self.item_embedding.weight.t()


register_model(
    ToyPluginRec,
    dataset_class=ToyPluginRecDataset,
    trainer_class=ToyPluginRecTrainer,
    properties_file=Path(__file__).with_name("ToyPluginRec.yaml"),
)
