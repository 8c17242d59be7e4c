"""The run plan of a comparison: which (row, seed) runs exist, in which order, with which settings.

* Rows: each ``--models`` entry is a row named by its model; each variant (``--variant``, ``--variants``) a
  row named by its label ("VLM2RecSASRec + MiniLM text"), a model with settings of its own.
* Order: seeds in the order given; within a seed, rows in the order given, except that a row whose model
  produces what another row's model consumes (``registry.model_outputs`` / ``model_inputs``) runs before it.
* Settings: ``--config_files`` for every row, then that row's ``--model_config`` files, then the
  ``--key=value`` arguments (a variant's own replace those of the same key) and the run's seed; the
  evaluation (``EVALUATION``, ``--protocol``) is imposed.
* Hand-off: a consumer gets the exact export of its producer's run of the same seed (``inputs.py``).
* Fingerprint: everything that decides a run's result (dataset, model, seed, protocol, config files and
  their content, arguments, the producer run it read). A ``result.json`` with the same fingerprint is kept
  when the command runs again; anything else is run again from scratch.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from recbole_vlm2rec.compare.files import file_sha1, yaml_keys
from recbole_vlm2rec.compare.inputs import INPUT_KINDS

PROG = "vlm2rec-compare"
# imposed on every model: the table needs these numbers, and the comparison the same evaluation
EVALUATION = {"metrics": ["Hit", "NDCG"], "topk": [10, 20], "valid_metric": "NDCG@10"}
PROTOCOLS = ("full", "uni100")
DEFAULT_SEED = 2020  # RecBole's default seed
# set per run by the command (or by its own options): never from --key=value
RESERVED_KEYS = ("seed", "checkpoint_dir", "model", "dataset", "config_files")
# a run's folder <out>/runs/<model>-seed<S>/ holds these
RESULT_FILE = "result.json"
FAILED_FILE = "failed.json"
REQUEST_FILE = "request.json"
LOG_FILE = "run.log"

RunKey = Tuple[str, int]


def option_key(arg: str) -> str:
    """``--key=value`` -> ``key``."""
    return arg[2:].split("=", 1)[0]


@dataclass(frozen=True)
class Variant:
    """A row of the comparison that is a model with settings of its own (``--key=value`` arguments)."""

    model: str
    argv: Tuple[str, ...] = ()


def run_folder_name(row: str) -> str:
    """The file-system-safe form of a row's name, for its run folders ("A + B text" -> "A_+_B_text")."""
    return re.sub(r"[^A-Za-z0-9.+_-]+", "_", row.strip()) or "_"


def producers_first(rows: Sequence[str], model_of: Callable[[str], str] = lambda row: row) -> List[str]:
    """``rows`` in their order, each producer moved just before the first row that consumes its export
    (``model_of`` gives a row's model)."""
    from recbole_vlm2rec.registry import model_inputs, model_outputs

    ordered: List[str] = []

    def place(row: str, pending: set) -> None:
        if row in ordered or row in pending:  # placed already, or a cycle: keep the given order
            return
        pending.add(row)
        for name in model_inputs(model_of(row)):
            for producer in rows:
                if producer != row and name in model_outputs(model_of(producer)):
                    place(producer, pending)
        ordered.append(row)

    for row in rows:
        place(row, set())
    return ordered


@dataclass
class Handoff:
    """What a run gets from other runs: extra arguments, the producer runs read, inputs its child derives."""

    argv: List[str] = field(default_factory=list)
    upstream_runs: List[Optional[str]] = field(default_factory=list)
    derive: List[str] = field(default_factory=list)
    reason: Optional[str] = None  # set when the run cannot start (its producer failed)


def export_path(record: dict, name: str) -> Optional[str]:
    """The path of export ``name`` of a finished run record, None when it has none."""
    if record.get("status") != "ok":
        return None
    path = (record.get("exports") or {}).get(name)
    if path is None and record.get("export_dir") and "exports" not in record:
        # a result.json from before exports were recorded by name: the export sits in its folder
        path = os.path.join(record["export_dir"], name)
    return path


class Plan:
    """The (row, seed) runs of one invocation and each run's request (what its child is asked to do).

    ``models`` are the rows' names, in the order given: a model's name, or a key of ``variants``."""

    def __init__(self, dataset: str, models: Sequence[str], seeds: Sequence[int], out: Path,
                 config_files: Sequence[str] = (), model_configs: Optional[Dict[str, List[str]]] = None,
                 extras: Sequence[str] = (), protocol: Optional[str] = None, run_timeout: Optional[float] = None,
                 variants: Optional[Dict[str, Variant]] = None):
        self.dataset = dataset
        self.variants = dict(variants or {})
        self.models = producers_first(models, self.model_of)
        self.seeds = list(seeds)
        self.out = Path(out).resolve()
        self.config_files = list(config_files)
        self.model_configs = dict(model_configs or {})
        self.extras = list(extras)
        self.protocol = protocol
        self.run_timeout = run_timeout

    def model_of(self, row: str) -> str:
        """The model a row runs."""
        return self.variants[row].model if row in self.variants else row

    def argv_of(self, row: str) -> List[str]:
        """The ``--key=value`` arguments of a row: the command's, those of the variant's keys replaced."""
        own = list(self.variants[row].argv) if row in self.variants else []
        keys = {option_key(arg) for arg in own}
        return [arg for arg in self.extras if option_key(arg) not in keys] + own

    def runs(self) -> List[RunKey]:
        """Every (model, seed), in the order they run."""
        return [(model, seed) for seed in self.seeds for model in self.models]

    def files_for(self, model: str) -> List[str]:
        return self.config_files + self.model_configs.get(model, [])

    def user_keys(self, model: str) -> set:
        """The keys the user set for ``model`` (config files and --key=value): those are never overridden."""
        keys = {option_key(arg) for arg in self.argv_of(model)}
        for path in self.files_for(model):
            keys |= yaml_keys(path)
        return keys

    def run_dir(self, model: str, seed: int) -> Path:
        return self.out / "runs" / f"{run_folder_name(model)}-seed{seed}"

    def producer_of(self, name: str, consumer: str) -> Optional[str]:
        """The first model of the comparison (other than ``consumer``) that exports ``name``."""
        from recbole_vlm2rec.registry import model_outputs

        return next((m for m in self.models if m != consumer and name in model_outputs(self.model_of(m))), None)

    def handoff(self, model: str, seed: int, records: Dict[RunKey, dict]) -> Handoff:
        """What ``model`` seed ``seed`` reads from the runs before it, given their records so far."""
        from recbole_vlm2rec.registry import model_inputs

        user_keys = self.user_keys(model)
        handoff = Handoff()
        for name in model_inputs(self.model_of(model)):
            kind = INPUT_KINDS.get(name)
            if kind is None or kind.config_key in user_keys:  # the user's own setting wins
                continue
            producer = self.producer_of(name, model)
            if producer is None:
                handoff.derive.append(name)
                continue
            record = records.get((producer, seed), {})
            path = export_path(record, name)
            if not path:
                why = "it failed" if record.get("status") == "failed" else f"it exported no {kind.label}"
                handoff.reason = (f"needs the {kind.label} of {producer} seed {seed}, and {why}; "
                                  f"see {self.run_dir(producer, seed) / LOG_FILE}")
                return handoff
            handoff.argv.append(f"--{kind.config_key}={path}")
            handoff.upstream_runs.append(record.get("run_id"))
        return handoff

    def request(self, model: str, seed: int, records: Dict[RunKey, dict]) -> Tuple[Optional[dict], Optional[str]]:
        """The child's request, or (None, reason) when the run cannot start (a failed producer run)."""
        handoff = self.handoff(model, seed, records)
        if handoff.reason:
            return None, handoff.reason
        run_dir = self.run_dir(model, seed)
        files = self.files_for(model)
        argv = self.argv_of(model) + [f"--seed={seed}"] + handoff.argv
        upstream = handoff.upstream_runs
        fingerprint = {
            "dataset": self.dataset,
            "model": self.model_of(model),
            "seed": seed,
            "protocol": self.protocol,
            "config_files": [[path, file_sha1(path)] for path in files],
            "argv": sorted(argv),
            # one producer (the usual case) is recorded as its run id, as before there could be several
            "upstream_run": upstream[0] if len(upstream) == 1 else (upstream or None),
            "evaluation": EVALUATION,
        }
        return {
            "model": self.model_of(model),
            "row": model,
            "dataset": self.dataset,
            "seed": seed,
            "protocol": self.protocol,
            "config_files": files,
            "argv": argv,
            "checkpoint_dir": str(run_dir / "saved"),
            "derive_inputs": handoff.derive,
            "result_file": str(run_dir / RESULT_FILE),
            "fingerprint": fingerprint,
        }, None
