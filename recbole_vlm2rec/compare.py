"""``vlm2rec-compare``: several models on one dataset, same split and evaluation, one results table.

Usage::

    vlm2rec-compare --dataset=NAME --models=SASRec,GRU4Rec,BERT4Rec,FDSA,SASRecF,VLM2Rec,VLM2RecSASRec
                    [--config_files="a.yaml b.yaml"] [--model_config MODEL=FILE ...] [--seeds=1,2,3]
                    [--protocol=full|uni100] [--out=DIR] [--run_timeout=SECONDS] [--key=value ...]

What it does:

* Every (model, seed) runs in its own subprocess (``python -m recbole_vlm2rec.compare --child REQUEST``),
  so that a crash or an out-of-memory in one model never takes the others down and RecBole's global state
  (logging, seeds) starts clean. The run's folder is ``<out>/runs/<model>-seed<S>/``: ``request.json``
  (what was asked), ``run.log`` (everything the run printed), ``saved/`` (its ``checkpoint_dir``) and, when it
  finished, ``result.json`` (written atomically: best validation, test result, train / validation / test
  evaluation times, parameter counts and, for VLM2Rec, the modality-dropout table and the export paths).
* Same evaluation for every model: ``metrics: [Hit, NDCG]``, ``topk: [10, 20]``, ``valid_metric: NDCG@10``
  are imposed (they override config files); the split is the dataset's (``eval_args`` from its properties or
  your config files). ``--protocol=full`` ranks against every item, ``--protocol=uni100`` against 100
  uniformly sampled negatives (only ``eval_args.mode`` changes; the split is kept). Without ``--protocol``
  the configured mode is used, and the table names it.
* FDSA and SASRecF get the dataset tools' discrete item features: ``selected_features`` = those of
  ``categories`` and ``brand`` that ``load_col`` loads for items, unless your config sets ``selected_features``.
* VLM2RecSASRec reads VLM2Rec's exported item embeddings. When both are requested, VLM2Rec runs first for
  each seed and VLM2RecSASRec gets ``--feature_prefix=<that run's export>/item_embeddings`` (if that VLM2Rec
  run failed, so does this one, saying why). Otherwise it uses your ``feature_prefix``, or the newest VLM2Rec
  export of the dataset under your ``checkpoint_dir`` (default ``saved/``), or fails with an error naming
  where it looked.
* ``--config_files`` apply to every model; settings for one model belong in its properties file or in a
  file passed for that model only with ``--model_config MODEL=FILE`` (repeatable; applied after
  ``--config_files``). Any other ``--key=value`` goes to every model's RecBole ``Config`` (highest priority);
  ``seed`` and ``checkpoint_dir`` are set per run by this command and cannot be passed.

Resuming: a run whose ``result.json`` exists and was made with the same settings (dataset, protocol, config
files and their content, ``--key=value`` arguments; for VLM2RecSASRec, the same VLM2Rec run) is skipped;
anything else is (re)run from scratch. Kill the command at any time and start it again with the same
arguments: finished runs are kept. Delete a run's ``result.json`` (or its folder) to redo it.

Outputs in ``--out`` (default ``compare/<dataset>``), rewritten after every run:

* ``results.csv`` / ``results.md``: one row per model, mean and (sample) standard deviation over the seeds
  that finished of Hit@10, NDCG@10, Hit@20, NDCG@20, training time, evaluation time; parameter count.
  Failed runs are listed with the last line of their log and the log's path.
* ``runs.csv``: one row per (model, seed).
* ``modality.csv`` / ``modality.md`` (when a model reported it, e.g. VLM2Rec): fused, text-only and
  image-only NDCG@10 / Hit@10.
* ``results.png``: NDCG@10 and Hit@10 per model, grouped bars with standard-deviation error bars (written
  at the end).

Times: ``train`` is ``trainer.fit`` without its per-epoch validation (for VLM2Rec it includes the export of
the item embeddings); ``eval`` is the final test evaluation (for VLM2Rec with the text-only and image-only
passes); the validation time is in ``runs.csv``.

Exit codes: 0 when at least one model finished at least one run (failed runs are reported in the table and
on stderr); 1 when every run of every model failed; 2 bad command line (unknown model or dataset, bad
``--seeds``, missing config file); 130 interrupted.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
import traceback
import uuid
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

PROG = "vlm2rec-compare"
METRICS = ("hit@10", "ndcg@10", "hit@20", "ndcg@20")
METRIC_LABELS = {"hit@10": "Hit@10", "ndcg@10": "NDCG@10", "hit@20": "Hit@20", "ndcg@20": "NDCG@20"}
# imposed on every model: the table needs these numbers, and the comparison the same evaluation
EVALUATION = {"metrics": ["Hit", "NDCG"], "topk": [10, 20], "valid_metric": "NDCG@10"}
PROTOCOLS = ("full", "uni100")
FEATURE_MODELS = ("FDSA", "SASRecF")          # models that read selected_features
DISCRETE_FEATURES = ("categories", "brand")  # written by dataset_tools
EXPORTING_MODEL = "VLM2Rec"
CONSUMING_MODEL = "VLM2RecSASRec"
RESERVED_KEYS = ("seed", "checkpoint_dir", "model", "dataset", "config_files")
RESULT_FILE = "result.json"
FAILED_FILE = "failed.json"
REQUEST_FILE = "request.json"
LOG_FILE = "run.log"
DEFAULT_SEED = 2020  # RecBole's default seed


class UsageError(Exception):
    """A problem with the command line that the user must fix (exit code 2)."""


# ------------------------------------------------------------------------------------------- small helpers
def _write_json_atomic(path: Path, content: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(content, handle, indent=2, sort_keys=True, default=str)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _read_json(path: Path) -> Optional[dict]:
    try:
        with open(path, encoding="utf-8") as handle:
            content = json.load(handle)
    except (OSError, ValueError):
        return None
    return content if isinstance(content, dict) else None


def _sha1(path: str) -> str:
    with open(path, "rb") as handle:
        return hashlib.sha1(handle.read()).hexdigest()


def _yaml_keys(path: str) -> set:
    import yaml

    with open(path, encoding="utf-8") as handle:
        content = yaml.load(handle, Loader=yaml.FullLoader)
    return set(content) if isinstance(content, dict) else set()


def _arg_key(arg: str) -> str:
    return arg[2:].split("=", 1)[0]


def _log_tail(path: Path, lines: int = 20) -> List[str]:
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - 16384))
            text = handle.read().decode("utf-8", errors="replace")
    except OSError:
        return []
    return [line.rstrip() for line in text.splitlines() if line.strip()][-lines:]


def _error_line(tail: Sequence[str]) -> str:
    """The line of a log tail that best says why the run failed (the exception line, else the last line)."""
    for line in reversed(tail):
        stripped = line.strip()
        if stripped.startswith(f"{PROG}: error:"):
            return stripped[len(f"{PROG}: error:"):].strip()
    for line in reversed(tail):
        head = line.strip().split(":", 1)[0]
        if head.endswith(("Error", "Exception", "Interrupt")) or head in ("Killed", "MemoryError"):
            return line.strip()
    return tail[-1].strip() if tail else "no output"


def _fmt_seconds(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, sec = divmod(int(round(seconds)), 60)
    return f"{minutes} min {sec:02d} s"


# ------------------------------------------------------------------------------------------------ parent
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        allow_abbrev=False,  # --seed=3 or --model=X must not be read as --seeds / --models
        description="Train and evaluate several models on one dataset with the same split and metrics; write a "
        "results table (CSV, Markdown) and a chart. Any other --key=value is passed to every model's RecBole "
        "Config (e.g. --epochs=1 --gpu_id='').",
    )
    parser.add_argument("--dataset", "-d", required=True, help="dataset name (as for run_recbole)")
    parser.add_argument("--models", "-m", required=True, help="comma-separated model names, e.g. SASRec,FDSA,VLM2Rec")
    parser.add_argument("--config_files", default=None, help="space-separated YAML files applied to every model")
    parser.add_argument(
        "--model_config", action="append", default=[], metavar="MODEL=FILE",
        help="YAML file(s) for one model only (space-separated), applied after --config_files; repeatable",
    )
    parser.add_argument("--seeds", default=str(DEFAULT_SEED), help=f"comma-separated seeds (default {DEFAULT_SEED})")
    parser.add_argument(
        "--protocol", choices=PROTOCOLS, default=None,
        help="evaluation: full ranking or 100 sampled negatives (default: the configured eval_args mode)",
    )
    parser.add_argument("--out", default=None, help="output folder (default compare/<dataset>)")
    parser.add_argument("--run_timeout", type=float, default=None, help="seconds after which a run is stopped (failed)")
    return parser


def _parse_seeds(text: str) -> List[int]:
    seeds = []
    for part in text.split(","):
        part = part.strip()
        try:
            seed = int(part)
        except ValueError:
            raise UsageError(f"bad --seeds={text!r}: expected comma-separated integers, e.g. --seeds=1,2,3") from None
        if seed < 0:
            raise UsageError(f"bad --seeds={text!r}: seeds must be non-negative integers")
        if seed in seeds:
            raise UsageError(f"bad --seeds={text!r}: seed {seed} is listed twice")
        seeds.append(seed)
    return seeds


def _parse_models(text: str) -> List[str]:
    from recbole_vlm2rec.registry import UnknownModelError, check_model_name

    models = []
    for name in text.split(","):
        name = name.strip()
        if not name:
            continue
        try:
            check_model_name(name)
        except UnknownModelError as error:
            raise UsageError(str(error)) from None
        if name not in models:
            models.append(name)
    if not models:
        raise UsageError("--models is empty: name at least one model, e.g. --models=SASRec,VLM2Rec")
    # VLM2RecSASRec reads VLM2Rec's export: VLM2Rec runs first
    if EXPORTING_MODEL in models and CONSUMING_MODEL in models:
        if models.index(CONSUMING_MODEL) < models.index(EXPORTING_MODEL):
            models.remove(EXPORTING_MODEL)
            models.insert(models.index(CONSUMING_MODEL), EXPORTING_MODEL)
    return models


def _split_files(text: Optional[str]) -> List[str]:
    return [os.path.abspath(f) for f in (text or "").split() if f]


def _parse_model_configs(entries: Sequence[str], models: Sequence[str]) -> Dict[str, List[str]]:
    per_model: Dict[str, List[str]] = {}
    for entry in entries:
        name, sep, files = entry.partition("=")
        if not sep or not name or not files.strip():
            raise UsageError(f"bad --model_config {entry!r}: expected MODEL=FILE (e.g. --model_config FDSA=fdsa.yaml)")
        if name not in models:
            raise UsageError(f"--model_config {entry!r}: model {name!r} is not in --models ({', '.join(models)})")
        per_model.setdefault(name, []).extend(_split_files(files))
    return per_model


def _check_extras(extras: Sequence[str]) -> None:
    for arg in extras:
        if not arg.startswith("--") or "=" not in arg:
            raise UsageError(
                f"unexpected argument {arg!r}: settings are passed as --key=value (one word, with '='), "
                "e.g. --epochs=1"
            )
        key = _arg_key(arg)
        if key in RESERVED_KEYS:
            hint = {"seed": "use --seeds", "checkpoint_dir": "each run saves into <out>/runs/<model>-seed<S>/saved",
                    "model": "use --models", "dataset": "use --dataset", "config_files": "use --config_files"}[key]
            raise UsageError(f"--{key} cannot be passed to {PROG}: {hint}")


class Comparison:
    """One invocation: the plan of runs, their execution (each in a subprocess) and the tables."""

    def __init__(self, args, extras: List[str], models: List[str], seeds: List[int],
                 config_files: List[str], model_configs: Dict[str, List[str]]):
        self.dataset = args.dataset
        self.protocol = args.protocol
        self.models = models
        self.seeds = seeds
        self.config_files = config_files
        self.model_configs = model_configs
        self.extras = extras
        self.out = Path(args.out or os.path.join("compare", args.dataset)).resolve()
        self.run_timeout = args.run_timeout
        self.runs: Dict[Tuple[str, int], dict] = {}   # (model, seed) -> result or failure record
        self.started = time.monotonic()
        self._process: Optional[subprocess.Popen] = None

    # ---------------------------------------------------------------------------------------- settings
    def files_for(self, model: str) -> List[str]:
        return self.config_files + self.model_configs.get(model, [])

    def user_keys(self, model: str) -> set:
        keys = {_arg_key(arg) for arg in self.extras}
        for path in self.files_for(model):
            keys |= _yaml_keys(path)
        return keys

    def run_dir(self, model: str, seed: int) -> Path:
        return self.out / "runs" / f"{model}-seed{seed}"

    def request(self, model: str, seed: int) -> Tuple[Optional[dict], Optional[str]]:
        """The child's request, or (None, reason) when the run cannot start (a failed upstream run)."""
        run_dir = self.run_dir(model, seed)
        files = self.files_for(model)
        argv = list(self.extras) + [f"--seed={seed}"]
        user_keys = self.user_keys(model)
        upstream = None
        if model == CONSUMING_MODEL and "feature_prefix" not in user_keys and EXPORTING_MODEL in self.models:
            upstream_result = self.runs.get((EXPORTING_MODEL, seed), {})
            export_dir = upstream_result.get("export_dir") if upstream_result.get("status") == "ok" else None
            if not export_dir:
                why = ("it failed" if upstream_result.get("status") == "failed"
                       else "it exported no item embeddings (export_embeddings: False?)")
                return None, (f"needs the item embeddings of {EXPORTING_MODEL} seed {seed}, and {why}; "
                              f"see {self.run_dir(EXPORTING_MODEL, seed) / LOG_FILE}")
            argv.append(f"--feature_prefix={os.path.join(export_dir, 'item_embeddings')}")
            upstream = upstream_result.get("run_id")
        fingerprint = {
            "dataset": self.dataset,
            "model": model,
            "seed": seed,
            "protocol": self.protocol,
            "config_files": [[path, _sha1(path)] for path in files],
            "argv": sorted(argv),
            "upstream_run": upstream,
            "evaluation": EVALUATION,
        }
        return {
            "model": model,
            "dataset": self.dataset,
            "seed": seed,
            "protocol": self.protocol,
            "config_files": files,
            "argv": argv,
            "checkpoint_dir": str(run_dir / "saved"),
            "set_selected_features": model in FEATURE_MODELS and "selected_features" not in user_keys,
            "search_exports": model == CONSUMING_MODEL and "feature_prefix" not in user_keys,
            "result_file": str(run_dir / RESULT_FILE),
            "fingerprint": fingerprint,
        }, None

    # ---------------------------------------------------------------------------------------- running
    def say(self, message: str) -> None:
        print(f"[{PROG} {_fmt_seconds(time.monotonic() - self.started)}] {message}", flush=True)

    def execute(self) -> None:
        total = len(self.models) * len(self.seeds)
        index = 0
        for seed in self.seeds:
            for model in self.models:
                index += 1
                self.run_one(model, seed, f"[{index}/{total}] {model} seed {seed}")
                self.write_tables()

    def run_one(self, model: str, seed: int, label: str) -> None:
        run_dir = self.run_dir(model, seed)
        request, reason = self.request(model, seed)
        if request is None:
            self.say(f"{label}: not run: {reason}")
            self.runs[(model, seed)] = {"status": "failed", "model": model, "seed": seed, "error": reason,
                                        "log": None}
            return
        previous = _read_json(run_dir / RESULT_FILE)
        if previous is not None and previous.get("fingerprint") == request["fingerprint"]:
            previous["status"] = "ok"
            self.runs[(model, seed)] = previous
            self.say(f"{label}: skipped, finished before ({run_dir / RESULT_FILE})")
            return
        if previous is not None:
            self.say(f"{label}: settings changed since its result.json was written: running it again")
        if run_dir.exists():
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True)
        _write_json_atomic(run_dir / REQUEST_FILE, request)
        log_path = run_dir / LOG_FILE
        self.say(f"{label}: running (log: {log_path})")
        command = [sys.executable, "-m", "recbole_vlm2rec.compare", "--child", str(run_dir / REQUEST_FILE)]
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join([root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        begin = time.monotonic()
        timed_out = False
        with open(log_path, "wb") as log:
            log.write(("$ " + " ".join(command) + "\n").encode())
            log.flush()
            self._process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
            try:
                returncode = self._process.wait(timeout=self.run_timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
                self._stop_child()
                returncode = self._process.returncode
            finally:
                if self._process.poll() is None:  # interrupted: never leave the child running
                    self._stop_child()
                self._process = None
        elapsed = time.monotonic() - begin
        result = _read_json(run_dir / RESULT_FILE)
        if returncode == 0 and result is not None:
            result["status"] = "ok"
            self.runs[(model, seed)] = result
            test = result.get("test_result") or {}
            scores = "  ".join(f"{METRIC_LABELS[m]} {test[m]:.4f}" for m in ("ndcg@10", "hit@10") if m in test)
            self.say(f"{label}: done in {_fmt_seconds(elapsed)}: {scores}")
            return
        tail = _log_tail(log_path)
        if timed_out:
            error = f"stopped after --run_timeout={self.run_timeout:g} s"
        elif returncode == 0:
            error = "the run ended without writing result.json"
        else:
            error = _error_line(tail)
        failure = {"status": "failed", "model": model, "seed": seed, "returncode": returncode, "error": error,
                   "log": str(log_path), "log_tail": tail, "elapsed_s": elapsed}
        _write_json_atomic(run_dir / FAILED_FILE, failure)
        self.runs[(model, seed)] = failure
        self.say(f"{label}: FAILED after {_fmt_seconds(elapsed)} (exit code {returncode}): {error}\n"
                 f"    log: {log_path}")
        print(f"{PROG}: {model} seed {seed} failed: {error} (log: {log_path})", file=sys.stderr, flush=True)

    def _stop_child(self) -> None:
        process = self._process
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    # ---------------------------------------------------------------------------------------- tables
    def summary(self) -> List[dict]:
        rows = []
        for model in self.models:
            runs = [self.runs[(model, s)] for s in self.seeds if (model, s) in self.runs]
            if not runs:
                continue
            ok = [r for r in runs if r.get("status") == "ok"]
            row = {"model": model, "runs_ok": len(ok), "runs": len(runs),
                   "status": "ok" if len(ok) == len(runs) else ("partial" if ok else "failed"),
                   "seeds": " ".join(str(r["seed"]) for r in ok)}
            for metric in METRICS:
                row[metric] = _mean_std([(r.get("test_result") or {}).get(metric) for r in ok])
            row["train_time_s"] = _mean_std([r.get("train_time_s") for r in ok])
            row["eval_time_s"] = _mean_std([r.get("eval_time_s") for r in ok])
            row["params"] = ok[0].get("params") if ok else None
            row["trainable_params"] = ok[0].get("trainable_params") if ok else None
            modes = {json.dumps(r.get("eval_mode"), sort_keys=True) for r in ok if r.get("eval_mode")}
            row["protocol"] = ",".join(sorted(_mode_name(json.loads(m)) for m in modes)) or (self.protocol or "")
            rows.append(row)
        return rows

    def failures(self) -> List[dict]:
        return [self.runs[(m, s)] for s in self.seeds for m in self.models
                if self.runs.get((m, s), {}).get("status") == "failed"]

    def write_tables(self) -> str:
        self.out.mkdir(parents=True, exist_ok=True)
        rows = self.summary()
        fields = ["model", "status", "runs_ok", "runs", "seeds"]
        for metric in METRICS:
            fields += [f"{metric}_mean", f"{metric}_std"]
        fields += ["train_time_s_mean", "train_time_s_std", "eval_time_s_mean", "eval_time_s_std",
                   "params", "trainable_params", "protocol"]
        csv_rows = []
        for row in rows:
            flat = {k: row[k] for k in ("model", "status", "runs_ok", "runs", "seeds", "params",
                                        "trainable_params", "protocol")}
            for key in list(METRICS) + ["train_time_s", "eval_time_s"]:
                mean, std = row[key]
                flat[f"{key}_mean"] = _num(mean)
                flat[f"{key}_std"] = _num(std)
            csv_rows.append(flat)
        _write_csv(self.out / "results.csv", fields, csv_rows)
        self._write_runs_csv()
        markdown = self.markdown(rows)
        _write_text_atomic(self.out / "results.md", markdown)
        self._write_modality()
        return markdown

    def markdown(self, rows: List[dict]) -> str:
        seeds = ", ".join(map(str, self.seeds))
        protocols = sorted({r["protocol"] for r in rows if r["protocol"]})
        lines = [f"# {self.dataset}: model comparison", "",
                 f"Evaluation: {', '.join(protocols) or 'as configured'}; seeds: {seeds}; "
                 "mean ± standard deviation over the seeds that finished.", ""]
        header = ["model", "runs"] + [METRIC_LABELS[m] for m in METRICS] + ["train (s)", "eval (s)", "params"]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "|".join(["---"] * 2 + ["---:"] * (len(header) - 2)) + "|")
        for row in rows:
            if row["runs_ok"] == 0:
                cells = ["failed"] * len(METRICS) + ["-", "-", "-"]
            else:
                cells = [_pm(*row[m], 4) for m in METRICS]
                cells += [_pm(*row["train_time_s"], 2), _pm(*row["eval_time_s"], 2), _count(row["params"])]
            lines.append("| " + " | ".join([row["model"], f"{row['runs_ok']}/{row['runs']}"] + cells) + " |")
        failures = self.failures()
        if failures:
            lines += ["", "## Failed runs", ""]
            for failure in failures:
                where = f" (log: `{failure['log']}`)" if failure.get("log") else ""
                lines.append(f"- {failure['model']} seed {failure['seed']}: {failure.get('error')}{where}")
        return "\n".join(lines) + "\n"

    def _write_runs_csv(self) -> None:
        fields = ["model", "seed", "status"] + list(METRICS) + [
            "valid_ndcg@10", "train_time_s", "valid_time_s", "eval_time_s", "params", "trainable_params",
            "eval_mode", "error", "log"]
        rows = []
        for seed in self.seeds:
            for model in self.models:
                run = self.runs.get((model, seed))
                if run is None:
                    continue
                test = run.get("test_result") or {}
                row = {"model": model, "seed": seed, "status": run.get("status"),
                       "valid_ndcg@10": _num((run.get("best_valid_result") or {}).get("ndcg@10")),
                       "eval_mode": _mode_name(run.get("eval_mode")) if run.get("eval_mode") else "",
                       "error": run.get("error", ""), "log": run.get("log", "")}
                row.update({m: _num(test.get(m)) for m in METRICS})
                for key in ("train_time_s", "valid_time_s", "eval_time_s", "params", "trainable_params"):
                    row[key] = _num(run.get(key))
                rows.append(row)
        _write_csv(self.out / "runs.csv", fields, rows)

    def _write_modality(self) -> None:
        per_model: Dict[str, List[dict]] = {}
        for seed in self.seeds:
            for model in self.models:
                run = self.runs.get((model, seed)) or {}
                if run.get("status") == "ok" and run.get("modality_results"):
                    per_model.setdefault(model, []).append(run["modality_results"])
        if not per_model:
            return
        fields = ["model", "variant", "runs"] + [f"{m}_{s}" for m in ("ndcg@10", "hit@10") for s in ("mean", "std")]
        rows = []
        lines = ["# Modality dropout (same users, same catalog)", "",
                 "| model | variant | runs | NDCG@10 | Hit@10 |", "|---|---|---:|---:|---:|"]
        for model, tables in per_model.items():
            for variant in ("fused", "text-only", "image-only"):
                values = [t.get(variant) or {} for t in tables]
                row = {"model": model, "variant": variant, "runs": len(tables)}
                cells = []
                for metric in ("ndcg@10", "hit@10"):
                    mean, std = _mean_std([v.get(metric) for v in values])
                    row[f"{metric}_mean"], row[f"{metric}_std"] = _num(mean), _num(std)
                    cells.append(_pm(mean, std, 4))
                rows.append(row)
                lines.append(f"| {model} | {variant} | {len(tables)} | " + " | ".join(cells) + " |")
        _write_csv(self.out / "modality.csv", fields, rows)
        _write_text_atomic(self.out / "modality.md", "\n".join(lines) + "\n")

    def write_chart(self) -> Optional[Path]:
        rows = [r for r in self.summary() if r["runs_ok"]]
        if not rows:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        names = [r["model"] for r in rows]
        width = 0.38
        figure, axes = plt.subplots(figsize=(max(5.0, 1.3 * len(rows) + 2), 4.0))
        for offset, metric in ((-width / 2, "ndcg@10"), (width / 2, "hit@10")):
            means = [r[metric][0] or 0.0 for r in rows]
            stds = [r[metric][1] or 0.0 for r in rows]
            positions = [i + offset for i in range(len(rows))]
            bars = axes.bar(positions, means, width, yerr=stds, capsize=4, label=METRIC_LABELS[metric])
            for bar, mean, std in zip(bars, means, stds):
                axes.annotate(f"{mean:.3f}", (bar.get_x() + bar.get_width() / 2, mean + std),
                              ha="center", va="bottom", fontsize=7, xytext=(0, 2), textcoords="offset points")
        axes.set_xticks(range(len(rows)))
        axes.set_xticklabels(names, rotation=20 if len(rows) > 4 else 0)
        axes.set_ylabel("test score")
        protocols = sorted({r["protocol"] for r in rows if r["protocol"]})
        axes.set_title(f"{self.dataset} ({', '.join(protocols) or 'as configured'}), "
                       f"mean ± std over {len(self.seeds)} seed(s)")
        axes.legend()
        axes.set_ylim(bottom=0)
        figure.tight_layout()
        path = self.out / "results.png"
        tmp = path.with_name(f".results.tmp-{os.getpid()}.png")
        figure.savefig(tmp, dpi=120)
        plt.close(figure)
        os.replace(tmp, path)
        return path


def _mean_std(values) -> Tuple[Optional[float], Optional[float]]:
    values = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def _num(value):
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return value


def _pm(mean, std, digits) -> str:
    if mean is None:
        return "-"
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")


def _count(value) -> str:
    if value is None:
        return "-"
    value = int(value)
    if value >= 1_000_000:
        return f"{value / 1e6:.2f}M"
    if value >= 10_000:
        return f"{value / 1e3:.1f}k"
    return str(value)


def _mode_name(mode) -> str:
    if isinstance(mode, dict):
        values = {mode.get("valid"), mode.get("test")}
        return values.pop() if len(values) == 1 else f"valid {mode.get('valid')}, test {mode.get('test')}"
    return str(mode)


def _write_csv(path: Path, fields: List[str], rows: List[dict]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def _prepare(args, extras: List[str]) -> Comparison:
    from recbole_vlm2rec import cli
    from recbole_vlm2rec.errors import VLM2RecError

    seeds = _parse_seeds(args.seeds)
    _check_extras(extras)
    models = _parse_models(args.models)
    config_files = _split_files(args.config_files)
    model_configs = _parse_model_configs(args.model_config, models)
    all_files = list(dict.fromkeys(config_files + [f for files in model_configs.values() for f in files]))
    try:
        cli._check_config_files(all_files)
    except cli.UsageError as error:
        raise UsageError(str(error)) from None
    saved_argv = sys.argv
    sys.argv = [saved_argv[0]] + list(extras)  # RecBole's Config reads --key=value from sys.argv
    try:
        cli._warn_unknown_keys(all_files, extras)
        try:
            cli._prepare_dataset(models[0], args.dataset, config_files)
        except (cli.UsageError, VLM2RecError) as error:  # VLM2RecError: a bad setting (ConfigError)
            raise UsageError(str(error)) from None
    finally:
        sys.argv = saved_argv
    return Comparison(args, list(extras), models, seeds, config_files, model_configs)


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--child"]:
        if len(argv) != 2:
            print(f"{PROG}: error: --child takes exactly one request file", file=sys.stderr)
            return 2
        return child_main(argv[1])
    parser = build_parser()
    args, extras = parser.parse_known_args(argv)
    try:
        import recbole_vlm2rec  # noqa: F401  (registers our models, so check_model_name knows them)

        comparison = _prepare(args, extras)
    except UsageError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2

    def _terminate(signum, frame):
        raise KeyboardInterrupt

    previous_handler = signal.signal(signal.SIGTERM, _terminate) if _main_thread() else None
    comparison.say(f"{len(comparison.models)} model(s) x {len(comparison.seeds)} seed(s) on {comparison.dataset}; "
                   f"output in {comparison.out}")
    try:
        comparison.execute()
    except KeyboardInterrupt:
        comparison._stop_child()
        comparison.write_tables()
        print(f"{PROG}: interrupted; finished runs are kept in {comparison.out}/runs and will be skipped "
              "when you run the same command again", file=sys.stderr)
        return 130
    finally:
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)
    markdown = comparison.write_tables()
    try:
        chart = comparison.write_chart()
    except Exception as error:  # noqa: BLE001 - the tables are written; a chart problem must not hide them
        chart = None
        print(f"{PROG}: warning: could not draw results.png: {type(error).__name__}: {error}", file=sys.stderr)
    print()
    print(markdown, flush=True)
    written = ["results.csv", "results.md", "runs.csv"]
    written += ["modality.csv", "modality.md"] if (comparison.out / "modality.csv").exists() else []
    written += ["results.png"] if chart else []
    comparison.say(f"wrote {', '.join(written)} in {comparison.out}")
    if not any(r.get("status") == "ok" for r in comparison.runs.values()):
        print(f"{PROG}: error: every run failed; see the logs listed above", file=sys.stderr)
        return 1
    return 0


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


# ------------------------------------------------------------------------------------------------- child
def child_main(request_path: str) -> int:
    """Run one (model, seed) as RecBole's ``run_recbole`` does, timing fit and evaluation; write result.json."""
    request = _read_json(Path(request_path))
    if request is None:
        print(f"{PROG}: error: cannot read the request file {request_path}", file=sys.stderr)
        return 2
    sys.argv = [sys.argv[0]] + list(request["argv"])  # RecBole's Config reads --key=value from sys.argv
    try:
        import recbole_vlm2rec  # noqa: F401
        from recbole_vlm2rec.errors import VLM2RecError
    except Exception:  # noqa: BLE001 - the log must show why
        traceback.print_exc()
        return 1
    try:
        result = _child_run(request)
    except VLM2RecError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr, flush=True)
        return 130
    except Exception:  # noqa: BLE001 - reported in the table; the traceback goes to run.log
        traceback.print_exc()
        return 1
    _write_json_atomic(Path(request["result_file"]), result)
    return 0


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, bool, int)) or value is None:
        return value
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)


def _child_run(request: dict) -> dict:
    from logging import getLogger

    from recbole.config import Config
    from recbole.data import create_dataset, data_preparation
    from recbole.utils import get_model, get_trainer, init_logger, init_seed, set_color

    model_name, dataset_name = request["model"], request["dataset"]
    config_files = request["config_files"] or None
    config_dict = dict(EVALUATION)
    first = Config(model=model_name, dataset=dataset_name, config_file_list=config_files, config_dict=config_dict)
    eval_args = dict(first["eval_args"])
    if request.get("protocol"):
        eval_args["mode"] = request["protocol"]  # only the mode: the configured split stays
    config_dict["eval_args"] = eval_args
    if request.get("set_selected_features"):
        load_col = first["load_col"] if isinstance(first["load_col"], dict) else {}
        item_columns = load_col.get("item") or []
        config_dict["selected_features"] = [f for f in DISCRETE_FEATURES if f in item_columns]
    # the run's own checkpoint_dir (highest priority, as on run_recbole's command line); ``first`` keeps the
    # user's, where VLM2RecSASRec looks for an earlier VLM2Rec export
    if request.get("checkpoint_dir"):
        sys.argv.append(f"--checkpoint_dir={request['checkpoint_dir']}")
    config = Config(model=model_name, dataset=dataset_name, config_file_list=config_files, config_dict=config_dict)

    init_seed(config["seed"], config["reproducibility"])
    init_logger(config)
    logger = getLogger()
    logger.info(sys.argv)
    logger.info(config)

    dataset = create_dataset(config)
    logger.info(dataset)
    train_data, valid_data, test_data = data_preparation(config, dataset)

    if request.get("search_exports") and config["feature_prefix"] is None and config["feature_modalities"]:
        # no VLM2Rec run in this comparison: look where run_recbole --model=VLM2Rec would have exported
        from recbole_vlm2rec.data.features import modality_list, resolve_feature_prefix
        from recbole_vlm2rec.losses import MODALITIES

        config["feature_prefix"] = resolve_feature_prefix(
            None, modality_list(config["feature_modalities"], MODALITIES), first["checkpoint_dir"], dataset.dataset_name,
            dataset.field2id_token[dataset.iid_field],
        )
        logger.info(f"feature_prefix: {config['feature_prefix']}")

    init_seed(config["seed"] + config["local_rank"], config["reproducibility"])
    model = get_model(config["model"])(config, train_data._dataset).to(config["device"])
    logger.info(model)
    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)

    valid_time = [0.0]
    original_valid_epoch = trainer._valid_epoch

    def timed_valid_epoch(*args, **kwargs):
        begin = time.perf_counter()
        try:
            return original_valid_epoch(*args, **kwargs)
        finally:
            valid_time[0] += time.perf_counter() - begin

    trainer._valid_epoch = timed_valid_epoch
    begin = time.perf_counter()
    best_valid_score, best_valid_result = trainer.fit(
        train_data, valid_data, saved=True, show_progress=config["show_progress"]
    )
    fit_time = time.perf_counter() - begin
    begin = time.perf_counter()
    test_result = trainer.evaluate(test_data, load_best_model=True, show_progress=config["show_progress"])
    eval_time = time.perf_counter() - begin

    logger.info(set_color("best valid ", "yellow") + f": {best_valid_result}")
    logger.info(set_color("test result", "yellow") + f": {test_result}")
    export_paths = getattr(trainer, "export_paths", None)
    export_dir = None
    if export_paths:
        export_dir = os.path.dirname(os.path.abspath(next(iter(export_paths.values()))))
        if not os.path.isdir(export_dir):
            export_dir = None
    result = {
        "run_id": uuid.uuid4().hex,
        "model": model_name,
        "dataset": dataset_name,
        "seed": int(config["seed"]),
        "eval_mode": dict(config["eval_args"]["mode"]),
        "split": config["eval_args"]["split"],
        "best_valid_score": best_valid_score,
        "best_valid_result": dict(best_valid_result or {}),
        "test_result": dict(test_result or {}),
        "train_time_s": fit_time - valid_time[0],
        "valid_time_s": valid_time[0],
        "eval_time_s": eval_time,
        "params": params,
        "trainable_params": trainable,
        "modality_results": getattr(trainer, "modality_results", None),
        "export_paths": export_paths,
        "export_dir": export_dir,
        "saved_model_file": getattr(trainer, "saved_model_file", None),
        "feature_prefix": config["feature_prefix"] if "feature_prefix" in config.final_config_dict else None,
        "selected_features": config["selected_features"] if "selected_features" in config.final_config_dict else None,
        "fingerprint": request["fingerprint"],
        "finished_at": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    return _jsonable(result)


if __name__ == "__main__":
    sys.exit(main())
