"""The comparison's outputs, rewritten after every run: results.csv / results.md (mean and standard
deviation per model), runs.csv (one row per run), modality.csv / modality.md (fused, text-only and image-only
scores, when a model reported them) and results.png (written at the end).

Every function takes the plan and the run records (``supervise.Supervisor.records``).
"""
from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from dataset_tools.atomic import atomic_path
from recbole_vlm2rec.compare.files import write_csv_atomic, write_text_atomic
from recbole_vlm2rec.compare.plan import Plan, RunKey

METRICS = ("hit@10", "ndcg@10", "hit@20", "ndcg@20")
METRIC_LABELS = {"hit@10": "Hit@10", "ndcg@10": "NDCG@10", "hit@20": "Hit@20", "ndcg@20": "NDCG@20"}
MODALITY_VARIANTS = ("fused", "text-only", "image-only")
Records = Dict[RunKey, dict]
MeanStd = Tuple[Optional[float], Optional[float]]


# ------------------------------------------------------------------------------------------ formatting
def mean_and_std(values) -> MeanStd:
    """Mean and sample standard deviation of the values that are numbers (std None for fewer than two)."""
    values = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def csv_number(value):
    """A CSV cell: empty for None, 6 significant digits for a float, anything else as it is."""
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return value


def mean_plus_minus_std(mean, std, digits: int) -> str:
    """``0.1234 ± 0.0100`` (the mean alone for one value, ``-`` for none)."""
    if mean is None:
        return "-"
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")


def short_count(value) -> str:
    """A parameter count for a table: ``126.0k``, ``1.20M``."""
    if value is None:
        return "-"
    value = int(value)
    if value >= 1_000_000:
        return f"{value / 1e6:.2f}M"
    if value >= 10_000:
        return f"{value / 1e3:.1f}k"
    return str(value)


def eval_mode_name(mode) -> str:
    """RecBole's ``eval_args.mode`` (a string or a valid/test dict) as one name."""
    if isinstance(mode, dict):
        values = {mode.get("valid"), mode.get("test")}
        return values.pop() if len(values) == 1 else f"valid {mode.get('valid')}, test {mode.get('test')}"
    return str(mode)


# ------------------------------------------------------------------------------------------ summary
def summary(plan: Plan, records: Records) -> List[dict]:
    """One row per model that has run: status, seeds, (mean, std) of each metric and time, parameters."""
    rows = []
    for model in plan.models:
        runs = [records[(model, s)] for s in plan.seeds if (model, s) in records]
        if not runs:
            continue
        ok = [r for r in runs if r.get("status") == "ok"]
        row = {"model": model, "runs_ok": len(ok), "runs": len(runs),
               "status": "ok" if len(ok) == len(runs) else ("partial" if ok else "failed"),
               "seeds": " ".join(str(r["seed"]) for r in ok)}
        for metric in METRICS:
            row[metric] = mean_and_std([(r.get("test_result") or {}).get(metric) for r in ok])
        row["train_time_s"] = mean_and_std([r.get("train_time_s") for r in ok])
        row["eval_time_s"] = mean_and_std([r.get("eval_time_s") for r in ok])
        row["params"] = ok[0].get("params") if ok else None
        row["trainable_params"] = ok[0].get("trainable_params") if ok else None
        modes = {json.dumps(r.get("eval_mode"), sort_keys=True) for r in ok if r.get("eval_mode")}
        row["protocol"] = ",".join(sorted(eval_mode_name(json.loads(m)) for m in modes)) or (plan.protocol or "")
        rows.append(row)
    return rows


def failures(plan: Plan, records: Records) -> List[dict]:
    return [records[key] for key in plan.runs() if records.get(key, {}).get("status") == "failed"]


# ------------------------------------------------------------------------------------------ tables
def write_tables(plan: Plan, records: Records) -> str:
    """Write results.csv, results.md, runs.csv and (when reported) modality.csv / .md; return the Markdown."""
    plan.out.mkdir(parents=True, exist_ok=True)
    rows = summary(plan, records)
    _write_results_csv(plan.out / "results.csv", rows)
    _write_runs_csv(plan, records)
    text = markdown(plan, records, rows)
    write_text_atomic(plan.out / "results.md", text)
    _write_modality(plan, records)
    return text


def _write_results_csv(path: Path, rows: List[dict]) -> None:
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
            flat[f"{key}_mean"] = csv_number(mean)
            flat[f"{key}_std"] = csv_number(std)
        csv_rows.append(flat)
    write_csv_atomic(path, fields, csv_rows)


def markdown(plan: Plan, records: Records, rows: List[dict]) -> str:
    """results.md: the per-model table, then the failed runs with their error line and log."""
    seeds = ", ".join(map(str, plan.seeds))
    protocols = sorted({r["protocol"] for r in rows if r["protocol"]})
    lines = [f"# {plan.dataset}: model comparison", "",
             f"Evaluation: {', '.join(protocols) or 'as configured'}; seeds: {seeds}; "
             "mean ± standard deviation over the seeds that finished.", ""]
    header = ["model", "runs"] + [METRIC_LABELS[m] for m in METRICS] + ["train (s)", "eval (s)", "params"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join(["---"] * 2 + ["---:"] * (len(header) - 2)) + "|")
    for row in rows:
        if row["runs_ok"] == 0:
            cells = ["failed"] * len(METRICS) + ["-", "-", "-"]
        else:
            cells = [mean_plus_minus_std(*row[m], 4) for m in METRICS]
            cells += [mean_plus_minus_std(*row["train_time_s"], 2), mean_plus_minus_std(*row["eval_time_s"], 2),
                      short_count(row["params"])]
        lines.append("| " + " | ".join([row["model"], f"{row['runs_ok']}/{row['runs']}"] + cells) + " |")
    failed = failures(plan, records)
    if failed:
        lines += ["", "## Failed runs", ""]
        for failure in failed:
            where = f" (log: `{failure['log']}`)" if failure.get("log") else ""
            lines.append(f"- {failure['model']} seed {failure['seed']}: {failure.get('error')}{where}")
    return "\n".join(lines) + "\n"


def _write_runs_csv(plan: Plan, records: Records) -> None:
    fields = ["model", "seed", "status"] + list(METRICS) + [
        "valid_ndcg@10", "train_time_s", "valid_time_s", "eval_time_s", "params", "trainable_params",
        "eval_mode", "error", "log"]
    rows = []
    for model, seed in plan.runs():
        run = records.get((model, seed))
        if run is None:
            continue
        test = run.get("test_result") or {}
        row = {"model": model, "seed": seed, "status": run.get("status"),
               "valid_ndcg@10": csv_number((run.get("best_valid_result") or {}).get("ndcg@10")),
               "eval_mode": eval_mode_name(run.get("eval_mode")) if run.get("eval_mode") else "",
               "error": run.get("error", ""), "log": run.get("log", "")}
        row.update({m: csv_number(test.get(m)) for m in METRICS})
        for key in ("train_time_s", "valid_time_s", "eval_time_s", "params", "trainable_params"):
            row[key] = csv_number(run.get(key))
        rows.append(row)
    write_csv_atomic(plan.out / "runs.csv", fields, rows)


def _write_modality(plan: Plan, records: Records) -> None:
    """modality.csv / .md: per model that reported a modality-dropout table, mean ± std over its seeds."""
    per_model: Dict[str, List[dict]] = {}
    for key in plan.runs():
        run = records.get(key) or {}
        if run.get("status") == "ok" and run.get("modality_results"):
            per_model.setdefault(key[0], []).append(run["modality_results"])
    if not per_model:
        return
    fields = ["model", "variant", "runs"] + [f"{m}_{s}" for m in ("ndcg@10", "hit@10") for s in ("mean", "std")]
    rows = []
    lines = ["# Modality dropout (same users, same catalog)", "",
             "| model | variant | runs | NDCG@10 | Hit@10 |", "|---|---|---:|---:|---:|"]
    for model, tables in per_model.items():
        for variant in MODALITY_VARIANTS:
            values = [t.get(variant) or {} for t in tables]
            row = {"model": model, "variant": variant, "runs": len(tables)}
            cells = []
            for metric in ("ndcg@10", "hit@10"):
                mean, std = mean_and_std([v.get(metric) for v in values])
                row[f"{metric}_mean"], row[f"{metric}_std"] = csv_number(mean), csv_number(std)
                cells.append(mean_plus_minus_std(mean, std, 4))
            rows.append(row)
            lines.append(f"| {model} | {variant} | {len(tables)} | " + " | ".join(cells) + " |")
    write_csv_atomic(plan.out / "modality.csv", fields, rows)
    write_text_atomic(plan.out / "modality.md", "\n".join(lines) + "\n")


# ------------------------------------------------------------------------------------------ chart
def write_chart(plan: Plan, records: Records) -> Optional[Path]:
    """results.png: NDCG@10 and Hit@10 per model, grouped bars with standard-deviation error bars."""
    rows = [r for r in summary(plan, records) if r["runs_ok"]]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    axes.set_xticklabels([r["model"] for r in rows], rotation=20 if len(rows) > 4 else 0)
    axes.set_ylabel("test score")
    protocols = sorted({r["protocol"] for r in rows if r["protocol"]})
    axes.set_title(f"{plan.dataset} ({', '.join(protocols) or 'as configured'}), "
                   f"mean ± std over {len(plan.seeds)} seed(s)")
    axes.legend()
    axes.set_ylim(bottom=0)
    figure.tight_layout()
    path = plan.out / "results.png"
    with atomic_path(path) as tmp:
        figure.savefig(tmp, dpi=120, format="png")
    plt.close(figure)
    return path
