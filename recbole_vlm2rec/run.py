"""One training-and-test run, as RecBole's ``quick_start.run_recbole`` does it, with what tools need reported.

``run_recbole`` here is the single code path of a run: the ``run_recbole`` command (``cli.run``, one process,
and each spawned worker of ``--nproc``) and every ``vlm2rec-compare`` child call it. It takes RecBole's steps
in RecBole's order with RecBole's log lines (the command line, the config, the dataset, the model, FLOPs, the
environment, "best valid" and "test result"), and also measures what a comparison needs: training time
without the per-epoch validation, validation and test evaluation times, parameter counts, and what the run
exported (``registry.model_outputs``) and reported (the modality-dropout table of our trainers).
"""
from __future__ import annotations

import os
import sys
import time
from logging import getLogger
from typing import Callable, Dict, Optional

# Called with (config, dataset) once the dataset is built and before the model is: a caller's last chance to
# adjust settings that depend on the data (vlm2rec-compare finds an earlier export there).
DatasetHook = Callable[[object, object], None]


def run_recbole(
    model: str,
    dataset: str,
    config_file_list=None,
    config_dict: Optional[dict] = None,
    saved: bool = True,
    queue=None,
    on_dataset: Optional[DatasetHook] = None,
) -> dict:
    """Train and test ``model`` on ``dataset``; return RecBole's result dict plus the measurements.

    RecBole's keys: ``best_valid_score``, ``valid_score_bigger``, ``best_valid_result``, ``test_result``.
    Added: ``model``, ``dataset``, ``seed``, ``eval_args``, ``train_time_s`` (``fit`` without its
    validation), ``valid_time_s``, ``eval_time_s`` (the final test evaluation), ``params``,
    ``trainable_params``, ``flops``, ``modality_results``, ``export_paths``, ``export_dir``, ``exports``
    (declared export name -> path), ``saved_model_file`` and ``config`` (the run's RecBole ``Config``).
    """
    from recbole.config import Config

    from recbole_vlm2rec.cross_device import leave_process_group

    config = Config(model=model, dataset=dataset, config_file_list=config_file_list, config_dict=config_dict)
    built = _build(config, on_dataset)
    measured = _train_and_test(config, built, saved)
    result = _result(config, built, measured)
    if not config["single_spec"]:
        leave_process_group()
    if config["local_rank"] == 0 and queue is not None:
        # what crosses the process boundary is RecBole's plain result, not the Config
        queue.put({key: value for key, value in result.items() if key != "config"})
    return result


def _build(config, on_dataset: Optional[DatasetHook]) -> dict:
    """RecBole's set-up: seed, logger, dataset, split, model (with its FLOPs count), trainer."""
    from recbole.data import create_dataset, data_preparation
    from recbole.data.transform import construct_transform
    from recbole.utils import get_flops, get_model, get_trainer, init_logger, init_seed, set_color

    init_seed(config["seed"], config["reproducibility"])
    init_logger(config)
    logger = getLogger()
    logger.info(sys.argv)
    logger.info(config)

    dataset = create_dataset(config)
    logger.info(dataset)
    train_data, valid_data, test_data = data_preparation(config, dataset)
    if on_dataset is not None:
        on_dataset(config, dataset)

    init_seed(config["seed"] + config["local_rank"], config["reproducibility"])
    model = get_model(config["model"])(config, train_data._dataset).to(config["device"])
    logger.info(model)
    flops = get_flops(model, dataset, config["device"], logger, construct_transform(config))
    logger.info(set_color("FLOPs", "blue") + f": {flops}")
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
    return {"logger": logger, "model": model, "trainer": trainer, "flops": flops,
            "train_data": train_data, "valid_data": valid_data, "test_data": test_data}


def _train_and_test(config, built: dict, saved: bool) -> dict:
    """RecBole's ``fit`` then ``evaluate`` on the test split, timed; RecBole's closing log lines."""
    from recbole.utils import get_environment, set_color

    trainer, logger = built["trainer"], built["logger"]
    valid_time = _time_validation(trainer)
    begin = time.perf_counter()
    best_valid_score, best_valid_result = trainer.fit(
        built["train_data"], built["valid_data"], saved=saved, show_progress=config["show_progress"]
    )
    fit_time = time.perf_counter() - begin
    begin = time.perf_counter()
    test_result = trainer.evaluate(built["test_data"], load_best_model=saved, show_progress=config["show_progress"])
    eval_time = time.perf_counter() - begin

    logger.info("The running environment of this training is as follows:\n" + get_environment(config).draw())
    logger.info(set_color("best valid ", "yellow") + f": {best_valid_result}")
    logger.info(set_color("test result", "yellow") + f": {test_result}")
    return {"best_valid_score": best_valid_score, "best_valid_result": best_valid_result,
            "test_result": test_result, "train_time_s": fit_time - valid_time[0],
            "valid_time_s": valid_time[0], "eval_time_s": eval_time}


def _time_validation(trainer) -> list:
    """Wrap the trainer's per-epoch validation so that its time can be taken out of the training time.

    Returns a one-element list that accumulates the seconds spent validating."""
    spent = [0.0]
    original_valid_epoch = trainer._valid_epoch

    def timed_valid_epoch(*args, **kwargs):
        begin = time.perf_counter()
        try:
            return original_valid_epoch(*args, **kwargs)
        finally:
            spent[0] += time.perf_counter() - begin

    trainer._valid_epoch = timed_valid_epoch
    return spent


def _result(config, built: dict, measured: dict) -> dict:
    import torch

    from recbole_vlm2rec.registry import model_outputs

    model, trainer = built["model"], built["trainer"]
    export_paths = getattr(trainer, "export_paths", None)
    export_dir = _export_dir(export_paths)
    parameters = list(model.parameters()) if isinstance(model, torch.nn.Module) else None
    return {
        "best_valid_score": measured["best_valid_score"],
        "valid_score_bigger": config["valid_metric_bigger"],
        "best_valid_result": measured["best_valid_result"],
        "test_result": measured["test_result"],
        "model": config["model"],
        "dataset": config["dataset"],
        "seed": config["seed"],
        "eval_args": config["eval_args"],
        "train_time_s": measured["train_time_s"],
        "valid_time_s": measured["valid_time_s"],
        "eval_time_s": measured["eval_time_s"],
        # LightGBM / XGBoost models are not torch modules: they have no parameter count
        "params": sum(p.numel() for p in parameters) if parameters is not None else None,
        "trainable_params": sum(p.numel() for p in parameters if p.requires_grad) if parameters is not None else None,
        "flops": built["flops"],
        "modality_results": getattr(trainer, "modality_results", None),
        "export_paths": export_paths,
        "export_dir": export_dir,
        "exports": declared_exports(model_outputs(config["model"]), export_paths),
        "saved_model_file": getattr(trainer, "saved_model_file", None),
        "config": config,
    }


def _export_dir(export_paths: Optional[Dict[str, str]]) -> Optional[str]:
    """The folder the trainer exported into (None when it exported nothing)."""
    if not export_paths:
        return None
    directory = os.path.dirname(os.path.abspath(next(iter(export_paths.values()))))
    return directory if os.path.isdir(directory) else None


def declared_exports(names, export_paths: Optional[Dict[str, str]]) -> Dict[str, str]:
    """Declared export name -> its path prefix, for each name whose files the trainer wrote.

    An export ``X`` is the files ``<folder>/X.*`` (e.g. ``item_embeddings.text.npy``, read back through the
    prefix ``<folder>/item_embeddings``) or the folder ``<folder>/X``."""
    found = {}
    for name in names:
        for path in (export_paths or {}).values():
            path = os.path.abspath(path)
            base = os.path.basename(path)
            if base == name or base.startswith(name + "."):
                found[name] = os.path.join(os.path.dirname(path), name)
                break
    return found
