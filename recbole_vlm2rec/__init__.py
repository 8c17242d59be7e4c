"""recbole-vlm2rec: VLM2Rec as a RecBole 1.2.1 plugin.

Importing this package (the ``run_recbole`` command does it for you):

1. applies the RecBole 1.2.1 compatibility layer (``compat``: numpy 2, torch >= 2.6, anomaly mode);
2. hooks our names and default property files into RecBole's lookups (``registry``);
3. registers our models, so ``run_recbole --model=VLM2Rec`` and RecBole's ``get_model``,
   ``create_dataset``, ``get_trainer`` and ``load_data_and_model`` find them.
"""
from recbole_vlm2rec import compat

compat.apply()

from recbole_vlm2rec import registry  # noqa: E402  (needs the compat layer first)

registry.install()

from recbole_vlm2rec.compat import UnsafeCheckpointError, load_checkpoint, load_data_and_model  # noqa: E402
from recbole_vlm2rec.registry import available_models, register_model  # noqa: E402

__version__ = "0.1.0"
__all__ = [
    "UnsafeCheckpointError",
    "available_models",
    "load_checkpoint",
    "load_data_and_model",
    "register_model",
]


def _register_our_models() -> None:
    from recbole_vlm2rec.data.dataset import VLM2RecDataset
    from recbole_vlm2rec.models.vlm2rec import VLM2Rec
    from recbole_vlm2rec.models.vlm2rec_sasrec import VLM2RecSASRec
    from recbole_vlm2rec.trainer import ModalityDiagnosticsTrainer, VLM2RecTrainer

    register_model(VLM2Rec, dataset_class=VLM2RecDataset, trainer_class=VLM2RecTrainer)
    register_model(VLM2RecSASRec, trainer_class=ModalityDiagnosticsTrainer)


_register_our_models()
