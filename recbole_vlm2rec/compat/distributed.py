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

And evaluation is exact on both back-ends. RecBole gives each rank every N-th evaluation sample (a
``DistributedSampler``, which pads the samples to a multiple of N by repeating the first ones), computes each
rank's metrics on its share, rounds them, and averages them weighted by share size: up to N - 1 users count
twice and a mean of rounded per-rank metrics is not the metric. Now, when every rank's collector holds one row
per sample (full ranking and sampled ranking, one row per user), the rows are gathered, put back in sample
order and cut to the real samples, and every rank computes the metrics of the whole evaluation set, as one
process would (``_map_reduce`` then has nothing to average). Otherwise (value metrics with sampled negatives:
several rows per sample) RecBole's averaging stays, and a warning says so once.
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


#: The collector's entries with one row per evaluation sample, in sample order (``Collector.eval_batch_collect``);
#: its other entries come from the training data, the same on every rank.
PER_SAMPLE_KEYS = ("rec.items", "rec.topk", "rec.meanrank", "rec.score", "data.label")
_warned_inexact = False


def gather_evaluation_rows(struct, samples: int) -> bool:
    """Replace this rank's per-sample rows of the collector's ``struct`` with every rank's, in sample order,
    without the ``DistributedSampler``'s padding (rank ``r`` holds samples ``r, r + N, ...`` of the padded
    list). Returns False, changing nothing, when a rank's rows are not one per sample (a collective: every rank
    calls it, and all agree)."""
    world = torch.distributed.get_world_size()
    per_rank = -(-samples // world)  # the sampler pads every rank to this many samples
    keys = [key for key in PER_SAMPLE_KEYS if key in struct]
    exact = torch.tensor([all(struct[key].shape[0] == per_rank for key in keys)], dtype=torch.int32,
                         device=struct[keys[0]].device if keys else "cpu")
    torch.distributed.all_reduce(exact, op=torch.distributed.ReduceOp.MIN)
    if not keys or not bool(exact):
        return False
    for key in keys:
        rows = struct[key].contiguous()
        shards = [torch.empty_like(rows) for _ in range(world)]
        torch.distributed.all_gather(shards, rows)
        # [N, per_rank, ...] -> sample j * N + r is row j of rank r
        struct.set(key, torch.stack(shards, dim=1).flatten(0, 1)[:samples])
    return True


def _exact_evaluation(evaluate):
    def wrapped(self, eval_data, load_best_model=True, model_file=None, show_progress=False):
        if self.config["single_spec"] or not eval_data:
            return evaluate(self, eval_data, load_best_model, model_file, show_progress)
        collector = self.eval_collector
        get_data_struct = collector.get_data_struct

        def gathered_data_struct():  # called once by evaluate, after the last batch
            global _warned_inexact
            struct = get_data_struct()
            self._evaluation_gathered = gather_evaluation_rows(struct, eval_data.sample_size)
            if not self._evaluation_gathered and not _warned_inexact:
                _warned_inexact = True
                self.logger.warning("Evaluation under --nproc: this evaluation has several rows per sample, so "
                                    "its metrics are RecBole's mean of per-process metrics, not the exact "
                                    "metrics of one process.")
            return struct

        collector.get_data_struct = gathered_data_struct
        try:
            return evaluate(self, eval_data, load_best_model, model_file, show_progress)
        finally:
            del collector.get_data_struct  # the class's method again
            self._evaluation_gathered = False

    return wrapped


def _map_reduce_unless_gathered(map_reduce):
    def wrapped(self, result, num_sample):
        if getattr(self, "_evaluation_gathered", False):
            return result  # every rank computed the metrics of the whole evaluation set
        return map_reduce(self, result, num_sample)

    return wrapped


def _cpu_distributed_training() -> None:
    global _ORIGINAL_INIT_DEVICE
    import recbole.config.configurator as configurator
    import recbole.trainer.trainer as trainer

    if _ORIGINAL_INIT_DEVICE is None:
        _ORIGINAL_INIT_DEVICE = configurator.Config._init_device
        configurator.Config._init_device = _init_device
        trainer.Trainer.evaluate = _wait_for_the_best_checkpoint(_exact_evaluation(trainer.Trainer.evaluate))
        trainer.Trainer._map_reduce = _map_reduce_unless_gathered(trainer.Trainer._map_reduce)
    trainer.DistributedDataParallel = distributed_data_parallel
    for name in _ENSURE_DIR_USERS:
        module = importlib.import_module(name)
        if hasattr(module, "ensure_dir"):
            module.ensure_dir = ensure_dir
