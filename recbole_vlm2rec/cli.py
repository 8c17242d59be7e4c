"""``run_recbole``: RecBole's ``run_recbole.py`` as an installed command that also knows our models.

Flags are RecBole's own: ``--model/-m``, ``--dataset/-d``, ``--config_files`` (space-separated),
``--nproc``, ``--ip``, ``--port``, ``--world_size``, ``--group_offset``. Every other ``--key=value`` is read
from ``sys.argv`` by RecBole's ``Config``, exactly as with RecBole's script.

Before handing over to RecBole, the command checks what RecBole would report badly: an unknown model
(RecBole says "No module named 'lightgbm'"), a missing dataset folder, an unreadable YAML file. It also
builds the embedded ``vlm2rec-demo`` dataset on first use.

Every value is then validated once RecBole's Config has merged them (``recbole_vlm2rec/settings.py``):
a bad one (``--epochs=abc``, ``--learning_rate=-1``, ``--finetune=lore``) stops the command before any data
is read, with a message naming the key, the value and what is allowed.

The run itself is ``recbole_vlm2rec.run.run_recbole``: RecBole's quick-start steps and log lines, the code
path every ``vlm2rec-compare`` child takes too. ``check_config_files``, ``warn_unknown_keys`` and
``prepare_dataset`` are the checks ``vlm2rec-compare`` makes before its runs as well.

Exit codes: 0 success; 2 bad command line or configuration files (unknown model, dataset or config file);
1 a bad setting or bad data (the message names the key or file, the value and what to do), found before
or while running; anything else is a bug and shows its traceback.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

from recbole_vlm2rec.errors import VLM2RecError

DEMO_DATASET = "vlm2rec-demo"
# RecBole's own example dataset; its data_path is forced to recbole/dataset_example/ml-100k.
BUILTIN_DATASETS = ("ml-100k",)


# RecBole's own run_recbole.py flags (not Config keys, but accepted as --key=value)
RUN_FLAGS = ("model", "dataset", "config_files", "nproc", "ip", "port", "world_size", "group_offset")


class UsageError(Exception):
    """A problem with the command line or configuration that the user must fix (exit code 2).

    The one such class of the package: ``vlm2rec-compare`` raises and catches it too."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="run_recbole",
        description="Run a RecBole model (built-in or from recbole-vlm2rec) on a dataset. "
        "Any other --key=value is passed to RecBole's Config (e.g. --epochs=1 --gpu_id='').",
    )
    parser.add_argument("--model", "-m", type=str, default="BPR", help="name of the model (default: BPR)")
    parser.add_argument("--dataset", "-d", type=str, default="ml-100k", help="name of the dataset")
    parser.add_argument("--config_files", type=str, default=None, help="space-separated YAML config files")
    parser.add_argument("--nproc", type=int, default=1, help="number of processes (GPUs) to use")
    parser.add_argument("--ip", type=str, default="localhost", help="master address for multi-GPU runs")
    parser.add_argument("--port", type=str, default="5678", help="master port for multi-GPU runs")
    parser.add_argument("--world_size", type=int, default=-1, help="total number of processes (all nodes)")
    parser.add_argument("--group_offset", type=int, default=0, help="rank offset of this node's processes")
    return parser


def check_config_files(config_files: List[str]) -> None:
    """Raise ``UsageError`` naming the first file that is missing, unreadable or not a YAML mapping."""
    import yaml

    for path in config_files:
        if not os.path.isfile(path):
            raise UsageError(f"config file not found: {path}")
        try:
            with open(path, "r", encoding="utf-8") as handle:
                content = yaml.load(handle, Loader=yaml.FullLoader)
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
            raise UsageError(f"cannot read config file {path}: {error}") from None
        if content is not None and not isinstance(content, dict):
            raise UsageError(
                f"config file {path} must hold a YAML mapping of key: value pairs, found {type(content).__name__}"
            )


# Keys of ours that any model reads (registry.py)
GENERAL_PLUGIN_KEYS = ("torch_num_threads",)
# How close a key must be to one of the selected model's keys to be taken for a typo of it: lamda/lambda
# (0.91) and beta1/beta (0.89) are, another model's own setting such as hidden_size/image_size (0.67) or
# alpha/lora_alpha (0.67) is not.
NEAR_MISS_CUTOFF = 0.8


def _yaml_keys(pattern: str) -> set:
    import glob

    import yaml

    keys = set()
    for path in glob.glob(pattern, recursive=True):
        with open(path, encoding="utf-8") as handle:
            content = yaml.load(handle, Loader=yaml.FullLoader)
        if isinstance(content, dict):
            keys.update(content)
    return keys


def _recbole_properties() -> str:
    import recbole

    return os.path.join(os.path.dirname(recbole.__file__), "properties")


def general_config_keys() -> set:
    """Keys any model reads: the run flags, RecBole's argument lists, its overall, dataset and quick-start
    property files, and ours for datasets."""
    from recbole.utils import argument_list

    from recbole_vlm2rec.registry import PROPERTIES_DIR

    keys = set(RUN_FLAGS) | set(GENERAL_PLUGIN_KEYS)
    for name in ("general_arguments", "training_arguments", "evaluation_arguments", "dataset_arguments"):
        keys.update(getattr(argument_list, name))
    recbole_properties = _recbole_properties()
    keys |= _yaml_keys(os.path.join(recbole_properties, "overall.yaml"))
    for folder in ("dataset", "quick_start_config"):
        keys |= _yaml_keys(os.path.join(recbole_properties, folder, "*.yaml"))
    keys |= _yaml_keys(os.path.join(str(PROPERTIES_DIR), "dataset", "*.yaml"))
    return keys


def model_config_keys(model: str) -> set:
    """Keys of ``model``'s own property files: RecBole's ``properties/model/<model>.yaml`` and the file a
    plugin registered for it."""
    from recbole_vlm2rec.registry import model_property_file

    keys = _yaml_keys(os.path.join(_recbole_properties(), "model", f"{model}.yaml"))
    plugin_file = model_property_file(model)
    if plugin_file is not None:
        keys |= _yaml_keys(str(plugin_file))
    return keys


def known_config_keys() -> set:
    """Every key some RecBole or recbole-vlm2rec property file or argument list defines."""
    from recbole_vlm2rec.registry import PROPERTIES_DIR

    keys = general_config_keys()
    for root in (_recbole_properties(), str(PROPERTIES_DIR)):
        keys |= _yaml_keys(os.path.join(root, "**", "*.yaml"))
    return keys


def warn_unknown_keys(config_files: List[str], argv: List[str], model: Optional[str] = None) -> None:
    """RecBole silently ignores a key it does not know (a typo such as ``hiden_size``): say so, with a
    suggestion. With ``model``, also a key that only other models read and that is a near miss of one of
    ``model``'s own keys (``lamda``, a setting of other RecBole models, for VLM2Rec's ``lambda``)."""
    import difflib

    import yaml

    given = []
    for path in config_files:
        with open(path, encoding="utf-8") as handle:
            given += [(key, path) for key in (yaml.load(handle, Loader=yaml.FullLoader) or {})]
    given += [(arg[2:].split("=", 1)[0], "the command line") for arg in argv if arg.startswith("--") and "=" in arg]
    known = known_config_keys()
    general = general_config_keys()
    own = model_config_keys(model) if model else set()
    for key, where in given:
        if key in general or key in own:
            continue
        near = difflib.get_close_matches(key, own, n=1, cutoff=NEAR_MISS_CUTOFF)
        if key in known:
            if near:
                print(
                    f"run_recbole: warning: key {key!r} in {where} is not a setting of {model} "
                    f"(did you mean {near[0]!r}?); only other models read it, so {model} ignores it",
                    file=sys.stderr,
                )
            continue
        close = near or difflib.get_close_matches(key, known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        print(
            f"run_recbole: warning: unknown key {key!r} in {where}{hint}; "
            "no RecBole or recbole-vlm2rec setting has this name, so it only matters to a custom model",
            file=sys.stderr,
        )


def dataset_dir(model: str, dataset: str, config_files: List[str]):
    """The folder RecBole will read ``dataset`` from, resolved with RecBole's own Config."""
    from recbole.config import Config

    config = Config(model=model, dataset=dataset, config_file_list=config_files or None)
    return config["data_path"]


def prepare_dataset(model: str, dataset: str, config_files: List[str]) -> None:
    """Build the embedded demo dataset on first use; raise ``UsageError`` when ``dataset`` has no atomic files.

    Builds a RecBole Config on the way, which validates every value (a bad one is a ``ConfigError``)."""
    if dataset in BUILTIN_DATASETS:
        return
    data_dir = dataset_dir(model, dataset, config_files)
    if dataset == DEMO_DATASET and not os.path.isfile(os.path.join(data_dir, f"{dataset}.inter")):
        from dataset_tools.demo import ensure_demo_dataset

        print(f"Building the {DEMO_DATASET} dataset into {data_dir} (first use) ...", flush=True)
        ensure_demo_dataset(os.path.dirname(os.path.normpath(data_dir)))
    atomic_files = [os.path.join(data_dir, f"{dataset}.{suffix}") for suffix in ("inter", "item", "user")]
    if not any(os.path.isfile(path) for path in atomic_files):
        raise UsageError(
            f"unknown dataset {dataset!r}: no atomic files found at {os.path.join(data_dir, dataset + '.inter')}. "
            "Set --data_path=DIR to the folder that holds DIR/<dataset>/<dataset>.inter, "
            "or convert raw data with `vlm2rec-data` (see README)."
        )


def _worker(rank: int, model: str, dataset: str, config_files, kwargs) -> None:
    """Entry point of each spawned process: import the plugin (registration), then run as RecBole's
    ``run_recboles`` does (its rank as ``local_rank``), through the same run function as one process."""
    import recbole_vlm2rec  # noqa: F401  (registers our models in this fresh process)
    from recbole_vlm2rec.run import run_recbole

    kwargs = dict(kwargs)
    kwargs["config_dict"] = dict(kwargs.get("config_dict") or {}, local_rank=rank)
    run_recbole(model, dataset, config_files, **kwargs)


def run(
    model: str,
    dataset: str,
    config_files: Optional[List[str]] = None,
    nproc: int = 1,
    world_size: int = -1,
    ip: str = "localhost",
    port: str = "5678",
    group_offset: int = 0,
):
    """Run one model on one dataset, as RecBole's ``run`` does (one process, or ``nproc`` spawned workers).

    One process returns ``recbole_vlm2rec.run.run_recbole``'s result dict (RecBole's keys plus times,
    parameter counts, exports); spawned workers return RecBole's part of it from the first worker."""
    import recbole_vlm2rec  # noqa: F401
    from recbole_vlm2rec.run import run_recbole

    if nproc == 1 and world_size <= 0:
        return run_recbole(model, dataset, config_files)

    # RecBole's own spawn target would not import this plugin in the workers: use ours.
    import torch.multiprocessing as mp

    world_size = nproc if world_size == -1 else world_size
    queue = mp.get_context("spawn").SimpleQueue()
    config_dict = {"world_size": world_size, "ip": ip, "port": port, "nproc": nproc, "offset": group_offset}
    kwargs = {"config_dict": config_dict, "queue": queue}
    mp.spawn(_worker, args=(model, dataset, config_files, kwargs), nprocs=nproc, join=True)
    return None if queue.empty() else queue.get()


def main(argv: Optional[List[str]] = None) -> int:
    if argv is not None:
        # RecBole's Config reads --key=value pairs from sys.argv: keep it in step with what we parse.
        sys.argv = [sys.argv[0]] + list(argv)
    args, _ = build_parser().parse_known_args(sys.argv[1:])
    config_files = args.config_files.strip().split(" ") if args.config_files else []

    try:
        import recbole_vlm2rec  # noqa: F401
        from recbole_vlm2rec.registry import UnknownModelError, check_model_name

        try:
            check_model_name(args.model)
        except UnknownModelError as error:
            raise UsageError(str(error)) from None
        check_config_files(config_files)
        warn_unknown_keys(config_files, sys.argv[1:], args.model)
        prepare_dataset(args.model, args.dataset, config_files)  # builds a Config: validates every value
    except UsageError as error:
        print(f"run_recbole: error: {error}", file=sys.stderr)
        return 2
    except VLM2RecError as error:  # a bad setting (ConfigError): the message names the key and the value
        print(f"run_recbole: error: {error}", file=sys.stderr)
        return 1

    try:
        run(
            args.model,
            args.dataset,
            config_files or None,
            nproc=args.nproc,
            world_size=args.world_size,
            ip=args.ip,
            port=args.port,
            group_offset=args.group_offset,
        )
    except KeyboardInterrupt:
        print("run_recbole: interrupted", file=sys.stderr)
        return 130
    except VLM2RecError as error:  # bad data or settings found while running: the message says what to do
        print(f"run_recbole: error: {error}", file=sys.stderr)
        return 1
    return 0



if __name__ == "__main__":
    sys.exit(main())
