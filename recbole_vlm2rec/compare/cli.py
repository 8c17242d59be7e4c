"""The ``vlm2rec-compare`` command line: argument parsing, the checks made before any run, ``main`` and its
exit codes (see the package docstring): 0 at least one run finished; 1 every run failed; 2 bad command
line; 130 interrupted.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from recbole_vlm2rec.cli import UsageError
from recbole_vlm2rec.compare import reports
from recbole_vlm2rec.compare.plan import (
    DEFAULT_SEED,
    PROG,
    PROTOCOLS,
    RESERVED_KEYS,
    Plan,
    Variant,
    option_key,
    run_folder_name,
)
from recbole_vlm2rec.compare.supervise import Supervisor

RESERVED_KEY_HINTS = {"seed": "use --seeds", "checkpoint_dir": "each run saves into <out>/runs/<model>-seed<S>/saved",
                      "model": "use --models", "dataset": "use --dataset", "config_files": "use --config_files"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        allow_abbrev=False,  # --seed=3 or --model=X must not be read as --seeds / --models
        description="Train and evaluate several models on one dataset with the same split and metrics; write a "
        "results table (CSV, Markdown) and a chart. Any other --key=value is passed to every model's RecBole "
        "Config (e.g. --epochs=1 --gpu_id='').",
    )
    parser.add_argument("--dataset", "-d", required=True, help="dataset name (as for run_recbole)")
    parser.add_argument("--models", "-m", default=None, help="comma-separated model names, e.g. SASRec,FDSA,VLM2Rec")
    parser.add_argument(
        "--variant", action="append", default=[], metavar="'NAME=MODEL --key=value ...'",
        help="a row named NAME: MODEL with settings of its own (replacing the command's for the same keys), e.g. "
        "'VLM2RecSASRec + MiniLM text=VLM2RecSASRec --feature_prefix=data/office/features/office'; repeatable",
    )
    parser.add_argument(
        "--variants", default=None, metavar="FILE",
        help="YAML file of variants: {NAME: {model: MODEL, <key>: <value>, ...}, ...}, rows after --variant's",
    )
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


def parse_seeds(text: str) -> List[int]:
    seeds: List[int] = []
    for part in text.split(","):
        try:
            seed = int(part.strip())
        except ValueError:
            raise UsageError(f"bad --seeds={text!r}: expected comma-separated integers, e.g. --seeds=1,2,3") from None
        if seed < 0:
            raise UsageError(f"bad --seeds={text!r}: seeds must be non-negative integers")
        if seed in seeds:
            raise UsageError(f"bad --seeds={text!r}: seed {seed} is listed twice")
        seeds.append(seed)
    return seeds


def parse_models(text: str) -> List[str]:
    """The model names, checked and without duplicates, in the order given (``Plan`` orders the runs)."""
    from recbole_vlm2rec.registry import UnknownModelError, check_model_name

    models: List[str] = []
    for name in (n.strip() for n in (text or "").split(",")):
        if not name:
            continue
        try:
            check_model_name(name)
        except UnknownModelError as error:
            raise UsageError(str(error)) from None
        if name not in models:
            models.append(name)
    return models


def _variant_argv(name: str, argv: Sequence[str]) -> Tuple[str, ...]:
    for arg in argv:
        if not arg.startswith("--") or "=" not in arg:
            raise UsageError(f"variant {name!r}: unexpected {arg!r}; settings are --key=value, e.g. --epochs=1")
        key = option_key(arg)
        if key in RESERVED_KEYS:
            raise UsageError(f"variant {name!r}: --{key} cannot be set per row: {RESERVED_KEY_HINTS[key]}")
    return tuple(argv)


def _yaml_value(value) -> str:
    """A YAML value as RecBole reads it from a command line (text as it is, anything else a Python literal)."""
    return value if isinstance(value, str) else repr(value)


def parse_variants(entries: Sequence[str], path: Optional[str]) -> Dict[str, Variant]:
    """The variants of ``--variant NAME=MODEL --k=v ...`` entries, then of the ``--variants`` YAML file."""
    import shlex

    import yaml

    from recbole_vlm2rec.registry import UnknownModelError, check_model_name

    found: List[Tuple[str, str, Tuple[str, ...]]] = []
    for entry in entries:
        name, sep, rest = entry.partition("=")
        words = shlex.split(rest) if sep else []
        if not sep or not name.strip() or not words:
            raise UsageError(f"bad --variant {entry!r}: expected 'NAME=MODEL --key=value ...', e.g. "
                             "--variant 'small=MODEL --hidden_size=32'")
        found.append((name.strip(), words[0], _variant_argv(name.strip(), words[1:])))
    if path:
        try:
            with open(path, encoding="utf-8") as handle:
                listed = yaml.safe_load(handle) or {}
        except OSError as error:
            raise UsageError(f"--variants {path}: cannot read it ({error.strerror})") from None
        except yaml.YAMLError as error:
            raise UsageError(f"--variants {path}: not valid YAML ({error})") from None
        if not isinstance(listed, dict) or not all(isinstance(v, dict) and "model" in v for v in listed.values()):
            raise UsageError(f"--variants {path}: expected {{NAME: {{model: MODEL, <key>: <value>, ...}}, ...}}")
        for name, settings in listed.items():
            argv = [f"--{key}={_yaml_value(value)}" for key, value in settings.items() if key != "model"]
            found.append((str(name), str(settings["model"]), _variant_argv(str(name), argv)))
    variants: Dict[str, Variant] = {}
    for name, model, argv in found:
        try:
            check_model_name(model)
        except UnknownModelError as error:
            raise UsageError(f"variant {name!r}: {error}") from None
        if name in variants:
            raise UsageError(f"variant {name!r} is defined twice")
        variants[name] = Variant(model, argv)
    return variants


def check_rows(models: Sequence[str], variants: Dict[str, Variant]) -> List[str]:
    """Every row's name, in order (models, then variants); names and their run folders must be distinct."""
    rows = list(models) + list(variants)
    if not rows:
        raise UsageError("no models: name at least one with --models (comma-separated, as run_recbole's --model) "
                         "or --variant")
    clash = [name for name in variants if name in models]
    if clash:
        raise UsageError(f"variant {clash[0]!r} has the name of a model in --models; name the variant by what it is")
    folders: Dict[str, str] = {}
    for row in rows:
        other = folders.setdefault(run_folder_name(row), row)
        if other != row:
            raise UsageError(f"rows {other!r} and {row!r} would share the run folder {run_folder_name(row)!r}; "
                             "rename one")
    return rows


def split_files(text: Optional[str]) -> List[str]:
    return [os.path.abspath(f) for f in (text or "").split() if f]


def parse_model_configs(entries: Sequence[str], models: Sequence[str]) -> Dict[str, List[str]]:
    per_model: Dict[str, List[str]] = {}
    for entry in entries:
        name, sep, files = entry.partition("=")
        if not sep or not name or not files.strip():
            raise UsageError(f"bad --model_config {entry!r}: expected MODEL=FILE (e.g. --model_config MODEL=its.yaml)")
        if name not in models:
            raise UsageError(f"--model_config {entry!r}: {name!r} is not a row of the comparison (--models or a "
                             f"variant: {', '.join(models)})")
        per_model.setdefault(name, []).extend(split_files(files))
    return per_model


def check_extras(extras: Sequence[str]) -> None:
    """Every other argument must be a ``--key=value`` for RecBole, and not a key this command sets itself."""
    for arg in extras:
        if not arg.startswith("--") or "=" not in arg:
            raise UsageError(
                f"unexpected argument {arg!r}: settings are passed as --key=value (one word, with '='), "
                "e.g. --epochs=1"
            )
        key = option_key(arg)
        if key in RESERVED_KEYS:
            raise UsageError(f"--{key} cannot be passed to {PROG}: {RESERVED_KEY_HINTS[key]}")


def prepare(args, extras: List[str]) -> Plan:
    """The plan of this invocation, after ``run_recbole``'s own checks (files, keys, dataset, settings)."""
    from recbole_vlm2rec import cli
    from recbole_vlm2rec.errors import VLM2RecError

    seeds = parse_seeds(args.seeds)
    check_extras(extras)
    models = parse_models(args.models)
    variants = parse_variants(args.variant, args.variants)
    rows = check_rows(models, variants)
    config_files = split_files(args.config_files)
    model_configs = parse_model_configs(args.model_config, rows)
    all_files = list(dict.fromkeys(config_files + [f for files in model_configs.values() for f in files]))
    cli.check_config_files(all_files)
    saved_argv = sys.argv
    sys.argv = [saved_argv[0]] + list(extras)  # RecBole's Config reads --key=value from sys.argv
    try:
        cli.warn_unknown_keys(all_files, list(extras) + [a for v in variants.values() for a in v.argv])
        try:
            cli.prepare_dataset(variants[rows[0]].model if rows[0] in variants else rows[0], args.dataset,
                                config_files)
        except VLM2RecError as error:  # a bad setting (ConfigError): a command-line problem here
            raise UsageError(str(error)) from None
    finally:
        sys.argv = saved_argv
    out = Path(args.out or os.path.join("compare", args.dataset))
    return Plan(args.dataset, rows, seeds, out, config_files, model_configs, extras, args.protocol,
                args.run_timeout, variants)


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--child"]:
        if len(argv) != 2:
            print(f"{PROG}: error: --child takes exactly one request file", file=sys.stderr)
            return 2
        from recbole_vlm2rec.compare.child import child_main

        return child_main(argv[1])
    args, extras = build_parser().parse_known_args(argv)
    try:
        import recbole_vlm2rec  # noqa: F401  (registers our models, so check_model_name knows them)

        plan = prepare(args, extras)
    except UsageError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    supervisor = Supervisor(plan)
    supervisor.after_each_run = lambda: reports.write_tables(plan, supervisor.records)
    supervisor.say(f"{len(plan.models)} row(s) x {len(plan.seeds)} seed(s) on {plan.dataset}; "
                   f"output in {plan.out}")
    if not _execute(supervisor):
        return 130
    return _finish(supervisor)


def _execute(supervisor: Supervisor) -> bool:
    """Run the plan; on Ctrl-C or SIGTERM stop the child, write the tables and return False."""
    def _terminate(signum, frame):
        raise KeyboardInterrupt

    previous_handler = signal.signal(signal.SIGTERM, _terminate) if _in_main_thread() else None
    try:
        supervisor.execute()
    except KeyboardInterrupt:
        supervisor.stop_child()
        reports.write_tables(supervisor.plan, supervisor.records)
        print(f"{PROG}: interrupted; finished runs are kept in {supervisor.plan.out}/runs and will be skipped "
              "when you run the same command again", file=sys.stderr)
        return False
    finally:
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)
    return True


def _finish(supervisor: Supervisor) -> int:
    """Write the tables and the chart, print the table; the exit code (1 when every run failed)."""
    plan, records = supervisor.plan, supervisor.records
    text = reports.write_tables(plan, records)
    try:
        chart = reports.write_chart(plan, records)
    except Exception as error:  # noqa: BLE001 - the tables are written; a chart problem must not hide them
        chart = None
        print(f"{PROG}: warning: could not draw results.png: {type(error).__name__}: {error}", file=sys.stderr)
    print()
    print(text, flush=True)
    written = ["results.csv", "results.md", "runs.csv"]
    written += ["modality.csv", "modality.md"] if (plan.out / "modality.csv").exists() else []
    written += ["results.png"] if chart else []
    supervisor.say(f"wrote {', '.join(written)} in {plan.out}")
    if not any(r.get("status") == "ok" for r in records.values()):
        print(f"{PROG}: error: every run failed; see the logs listed above", file=sys.stderr)
        return 1
    return 0


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
