"""Distributed training on CPUs (section 14 of ``recbole_vlm2rec.compat``).

RecBole 1.2.1's ``--nproc`` path assumes GPUs: ``Config._init_device`` always starts the process group with
NCCL, pins the process to ``cuda:<local_rank>`` and asserts one GPU id per process, and the trainer wraps the
model in ``DistributedDataParallel(model, device_ids=[local_rank])``, which is for CUDA modules only. With
``gpu_id: ''`` (or no CUDA at all) each spawned process now joins a ``gloo`` process group and stays on the
CPU, and the model is wrapped without ``device_ids``; on GPUs RecBole's own NCCL path is unchanged. On both,
DDP leaves frozen parameters (a VLM's backbone under LoRA) alone. So the
distributed path runs, and is tested, on CPU-only machines, and users can debug it without GPUs.

Two races between the ranks are closed on both back-ends:

* RecBole's ``ensure_dir`` checks for a folder and then creates it: two ranks creating ``log/<model>`` (or
  the checkpoint folder) at once made one fail with ``FileExistsError``. It now creates with ``exist_ok``.
* after ``fit`` every rank reloads the best checkpoint, which only rank 0 writes, and nothing made the others
  wait for it (another rank read a half-written file). ``evaluate`` with ``load_best_model`` now starts with
  a barrier.
"""
from __future__ import annotations

import importlib
import os

import torch

_ORIGINAL_INIT_DEVICE = None
# RecBole modules that imported ensure_dir by name
_ENSURE_DIR_USERS = ("recbole.utils.utils", "recbole.utils", "recbole.utils.logger", "recbole.trainer.trainer",
                     "recbole.data.utils", "recbole.data.dataset.dataset")


def uses_cpu(gpu_id) -> bool:
    """Whether a run with this ``gpu_id`` setting stays on the CPU (RecBole's own rule)."""
    return len(str(gpu_id)) == 0 or not torch.cuda.is_available()


def _init_device(self) -> None:
    values = self.final_config_dict
    if "local_rank" not in values or not uses_cpu(values["gpu_id"]):
        return _ORIGINAL_INIT_DEVICE(self)  # one process, or NCCL on GPUs: RecBole's own path
    values["gpu_id"] = str(values["gpu_id"])
    torch.distributed.init_process_group(
        backend="gloo",
        rank=values["local_rank"] + values["offset"],
        world_size=values["world_size"],
        init_method=f"tcp://{values['ip']}:{values['port']}",
    )
    values["device"] = torch.device("cpu")
    values["single_spec"] = False
    if values["local_rank"] != 0:  # as RecBole does: one rank reports
        values["state"] = "error"
        values["show_progress"] = False
        values["verbose"] = False


def distributed_data_parallel(module, device_ids=None, **kwargs):
    """RecBole's ``DistributedDataParallel(model, device_ids=[local_rank])``, without ``device_ids`` for a
    module on the CPU (where torch refuses them), and with the frozen parameters left out: DDP would
    broadcast them from rank 0 when it wraps the model (a 3B backbone: ~6 GB over the network) though every
    process loaded the same weights, and they have no gradient to average."""
    from torch.nn.parallel import DistributedDataParallel

    frozen = [name for name, p in module.named_parameters() if not p.requires_grad]
    if frozen:
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, frozen)
    on_cpu = all(p.device.type == "cpu" for p in module.parameters())
    return DistributedDataParallel(module, device_ids=None if on_cpu else device_ids, **kwargs)


def ensure_dir(dir_path) -> None:
    """RecBole's ``ensure_dir`` without its check-then-create race between processes."""
    os.makedirs(dir_path, exist_ok=True)


def _wait_for_the_best_checkpoint(evaluate):
    def wrapped(self, eval_data, load_best_model=True, model_file=None, show_progress=False):
        if load_best_model and not self.config["single_spec"]:
            torch.distributed.barrier()  # rank 0 has saved the best model by the time it gets here
        return evaluate(self, eval_data, load_best_model, model_file, show_progress)

    return wrapped


def _cpu_distributed_training() -> None:
    global _ORIGINAL_INIT_DEVICE
    import recbole.config.configurator as configurator
    import recbole.trainer.trainer as trainer

    if _ORIGINAL_INIT_DEVICE is None:
        _ORIGINAL_INIT_DEVICE = configurator.Config._init_device
        configurator.Config._init_device = _init_device
        trainer.Trainer.evaluate = _wait_for_the_best_checkpoint(trainer.Trainer.evaluate)
    trainer.DistributedDataParallel = distributed_data_parallel
    for name in _ENSURE_DIR_USERS:
        module = importlib.import_module(name)
        if hasattr(module, "ensure_dir"):
            module.ensure_dir = ensure_dir
