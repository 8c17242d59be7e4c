"""Inside a child process (``python -m recbole_vlm2rec.compare --child REQUEST``): one (model, seed) run.

The child turns its request (``plan.Plan.request``) into RecBole settings: the imposed evaluation, the
``--protocol`` mode, the inputs it derives itself (``inputs.py``) and the run's own ``checkpoint_dir``. The
run is ``recbole_vlm2rec.run.run_recbole``, the very function ``run_recbole`` runs; the child only
consumes its result and writes it, with the request's fingerprint, to ``result.json`` (atomically).

Exit codes: 0 done (``result.json`` written); 1 the run failed (a ``vlm2rec-compare: error:`` line for an
error the user can act on, else the traceback, in the run's log); 2 unreadable request; 130 interrupted.
"""
from __future__ import annotations

import sys
import time
import traceback
import uuid
from pathlib import Path

from recbole_vlm2rec.compare.files import read_json, write_json_atomic
from recbole_vlm2rec.compare.inputs import INPUT_KINDS
from recbole_vlm2rec.compare.plan import EVALUATION, PROG


def child_main(request_path: str) -> int:
    """Run the request in ``request_path``; write its result.json. Returns the exit code."""
    request = read_json(Path(request_path))
    if request is None:
        print(f"{PROG}: error: cannot read the request file {request_path}", file=sys.stderr)
        return 2
    sys.argv = [sys.argv[0]] + list(request["argv"])  # RecBole's Config reads --key=value from sys.argv
    try:
        import recbole_vlm2rec  # noqa: F401  (registers our models in this fresh process)
        from recbole_vlm2rec.errors import VLM2RecError
    except Exception:  # noqa: BLE001 - the log must show why
        traceback.print_exc()
        return 1
    try:
        result = run_request(request)
    except VLM2RecError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr, flush=True)
        return 130
    except Exception:  # noqa: BLE001 - reported in the table; the traceback goes to run.log
        traceback.print_exc()
        return 1
    write_json_atomic(Path(request["result_file"]), result)
    return 0


def run_settings(request: dict):
    """(config_dict, preliminary Config) for the run: the imposed evaluation and the derived inputs.

    The preliminary Config merges the user's settings (files, properties, command line) before the run's
    own ``checkpoint_dir`` is added: it is what the configured split, ``load_col`` and the user's
    ``checkpoint_dir`` are read from."""
    from recbole.config import Config

    config_dict = dict(EVALUATION)
    preliminary = Config(model=request["model"], dataset=request["dataset"],
                         config_file_list=request["config_files"] or None, config_dict=config_dict)
    eval_args = dict(preliminary["eval_args"])
    if request.get("protocol"):
        eval_args["mode"] = request["protocol"]  # only the mode: the configured split stays
    config_dict["eval_args"] = eval_args
    for name in request.get("derive_inputs") or ():
        kind = INPUT_KINDS.get(name)
        if kind is not None and kind.settings is not None:
            config_dict.update(kind.settings(preliminary))
    return config_dict, preliminary


def run_request(request: dict) -> dict:
    """Run the request through ``recbole_vlm2rec.run.run_recbole``; return the result.json content."""
    from recbole_vlm2rec.run import run_recbole

    config_dict, preliminary = run_settings(request)
    hooks = [INPUT_KINDS[name].on_dataset for name in request.get("derive_inputs") or ()
             if name in INPUT_KINDS and INPUT_KINDS[name].on_dataset is not None]

    def on_dataset(config, dataset):
        for hook in hooks:
            hook(preliminary, config, dataset)

    if request.get("checkpoint_dir"):
        # the run's own folder, with the command line's (highest) priority, as `run_recbole --checkpoint_dir`
        sys.argv.append(f"--checkpoint_dir={request['checkpoint_dir']}")
    outcome = run_recbole(request["model"], request["dataset"], request["config_files"] or None, config_dict,
                          saved=True, on_dataset=on_dataset)
    return result_record(request, outcome)


def result_record(request: dict, outcome: dict) -> dict:
    """The result.json content: the run's measurements, the settings of its inputs and the fingerprint."""
    config = outcome["config"]
    keys = ("best_valid_score", "best_valid_result", "test_result", "train_time_s", "valid_time_s",
            "eval_time_s", "params", "trainable_params", "modality_results", "export_paths", "export_dir",
            "exports", "saved_model_file")
    result = {key: outcome[key] for key in keys}
    result.update({
        "run_id": uuid.uuid4().hex,
        "model": request["model"],
        "dataset": request["dataset"],
        "seed": int(outcome["seed"]),
        "eval_mode": dict(outcome["eval_args"]["mode"]),
        "split": outcome["eval_args"]["split"],
        "fingerprint": request["fingerprint"],
        "finished_at": time.strftime("%Y-%m-%d %H:%M:%S"),
    })
    for kind in INPUT_KINDS.values():  # what each input setting ended up as (e.g. the prefix actually read)
        key = kind.config_key
        result[key] = config[key] if key in config.final_config_dict else None
    for key in ("best_valid_result", "test_result"):
        result[key] = dict(result[key] or {})
    return jsonable(result)


def jsonable(value):
    """``value`` with every number a plain float or int and every other object a string (for JSON)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (str, bool, int)) or value is None:
        return value
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)
