"""Modality collapse: does plain contrastive fine-tuning let one modality take over, and do WPCL and CRTR help?

The experiment of the paper's central claim, on a synthetic catalog where it can show (issue 12):

* the catalog (``COLLAPSE_SPEC``, fixed before the first comparison run) plants a text attribute (scent
  theme, named in the title) and an image attribute (pattern, drawn dark on a light background so that the
  vision tower can see it); the next item depends on both jointly, so text alone and image alone each
  reach only part of the attainable accuracy (the oracle hit rates printed with the table);
* attribute ceilings (``dataset_tools.synthetic.attribute_ceilings``): the expected NDCG@10 of a scorer that
  knows a planted attribute of the last history item and nothing else, on the benchmark's own evaluation
  (full ranking, history items ranked as RecBole ranks them for sequential models). A uni-modal model that
  has learnt its attribute perfectly, and no item identity, sits at its modality's ceiling; the
  *learnability* summary reads each ``<modality> alone`` row against the untrained row and that ceiling;
* uni-modal references (``text alone``, ``image alone``: ``modalities: [text]`` / ``[image]``) say what each
  modality reaches on its own; a modality's *retention* inside a jointly trained model is its NDCG@10 there
  divided by its NDCG@10 when trained alone (per seed), the collapse measure of the multimodal-imbalance
  literature;
* linear probes of the planted attributes on each modality's item embeddings, untrained and trained;
* rows: untrained, text alone, image alone, plain (beta 0, lambda 0), +WPCL, +CRTR, VLM2Rec, and a small
  beta/lambda sweep whose point is selected on the validation split (``VLM2Rec (val-selected)``).

Every row trains through RecBole's own pieces (Config -> dataset -> VLM2Rec -> VLM2RecTrainer) with the same
data, seed, backbone initialisation and number of epochs, and is evaluated after its last epoch (no best-epoch
selection) with full ranking, with fused, text-only and image-only scores; each epoch also evaluates the
validation split per modality (the curves). Seed ``s`` sets RecBole's ``seed`` and ``tiny_seed``; the catalog is
the same for every seed. Runs are independent and deterministic, so ``--jobs`` changes the time, not a number.

    python benchmarks/modality_collapse.py            # the default run: 3 seeds, ~60 min on 2 idle CPU cores
    python benchmarks/modality_collapse.py --quick --out /tmp/mc   # smoke test: 1 seed, 150 users, 1 epoch
    python benchmarks/modality_collapse.py --dataset my-catalog --data_path data/ \\
        --vlm_name_or_path /models/Qwen2.5-VL-3B-Instruct --config_files my.yaml --device cuda --seeds 0

On a user's own dataset (``--dataset``) nothing of the synthetic set-up is pinned: the model's defaults, then
``--config_files``, then ``--vlm_name_or_path`` / ``--device`` / ``--epochs``, and only the rows' beta, lambda and
modalities are the benchmark's; probes and oracle rates need planted attributes and are left out.

Writes to ``--out`` (default ``benchmarks/results/modality_collapse``): ``results.json`` (``{"seeds", "rows":
{row: {metric: {"values", "mean", "stderr"}}}, ...}``), ``results.md`` (the tables), ``modality_metrics.png``
(per-modality test NDCG@10 per row) and ``curves.png`` (per-modality validation NDCG@10 over epochs, plain vs
VLM2Rec); prints the table.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import math
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Tuple

REPO = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, REPO)

from dataset_tools.synthetic import SyntheticSpec  # noqa: E402  (after the path set-up)

SYNTHETIC_DATASET = "modality-collapse-synth"

#: The catalog of the default run. 4 themes x 4 patterns, 320 items, 1,000 users; dark-on-light patterns (the
#: demo's random colour polarity hides the pattern from linear patch features: see the probes in the README).
COLLAPSE_SPEC = SyntheticSpec(seed=7, items=320, users=1000, text_signal=1.0, image_signal=1.0, image_size=64,
                              text_values=4, image_values=4, image_colours="dark-on-light", min_history=5,
                              max_history=20)
QUICK_SPEC = SyntheticSpec(seed=7, items=80, users=150, image_size=32, text_values=4, image_values=4,
                           image_colours="dark-on-light", min_history=5, max_history=8)
DEFAULT_SEEDS = (0, 1, 2)
DEFAULT_EPOCHS = 2


@dataclass(frozen=True)
class Row:
    """One trained (or untrained) configuration: a row of the table."""

    name: str
    beta: float = 0.0
    lambda_: float = 0.0
    modalities: Tuple[str, ...] = ("text", "image")
    train: bool = True
    settings: Tuple[Tuple[str, object], ...] = ()  # further settings of this row only


ROWS = (
    Row("untrained", train=False),
    Row("text alone", modalities=("text",)),
    Row("image alone", modalities=("image",)),
    Row("plain"),
    Row("+WPCL", beta=0.2),
    Row("+CRTR", lambda_=0.1),
    Row("VLM2Rec", beta=0.2, lambda_=0.1),
    # the detector under test (issue 12): the loss criterion calls a collapsed modality strong
    Row("VLM2Rec, accuracy detector", beta=0.2, lambda_=0.1, settings=(("weak_criterion", "accuracy"),)),
)
#: The beta/lambda sweep around VLM2Rec's row (which is one of its points); selected on validation.
SWEEP = tuple(Row(f"sweep beta={b} lambda={l}", beta=b, lambda_=l) for b, l in ((0.5, 0.1), (0.2, 0.3), (0.5, 0.3)))
SELECTED = "VLM2Rec (val-selected)"
SELECTION_METRIC = "valid_fused_ndcg@10"

#: The pinned settings of the synthetic run: the demo preset (properties/quick_start/VLM2Rec_on_vlm2rec-demo.yaml)
#: written out, so that the benchmark does not move when the preset does, plus a trainable vision tower.
SYNTHETIC_SETTINGS = {
    "vlm_name_or_path": "tiny-qwen2-vl",
    "vlm_dtype": "fp32",
    "gradient_checkpointing": False,
    "finetune": "full",
    "train_vision_tower": True,
    "learning_rate": 0.001,
    "image_size": 56,
    "max_text_tokens": 32,
    "item_text_fields": ["title"],
    "max_history_items": 5,
    "train_batch_size": 64,
    "tau": 0.05,
    "wpcl_form": "relative",
    "weak_criterion": "loss",
    "crtr_relation": "item",
    # The committed results ran one left-padded forward per prompt batch, from before length buckets existed;
    # buckets change the embeddings only by float rounding, but kept at 1 a rerun repeats those numbers exactly.
    "length_buckets": 1,
}
#: What every run needs, on any dataset: full-ranking evaluation of the final model, per modality.
EVALUATION_SETTINGS = {
    "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "mode": "full", "group_by": "user"},
    "metrics": ["Hit", "NDCG"],
    "topk": [10],
    "valid_metric": "NDCG@10",
    "modality_dropout_eval": True,
    "grad_norm_diagnostics": True,
    "export_embeddings": False,
    "show_progress": False,
    "torch_num_threads": 1,
    "reproducibility": True,
}
MODES = ("fused", "text_only", "image_only")
SCORE_MODES = {"fused": "fused", "text_only": "text-only", "image_only": "image-only"}  # VLM2RecTrainer's names
METRICS = ("ndcg@10", "hit@10")
TABLE_METRICS = ("fused_ndcg@10", "text_only_ndcg@10", "image_only_ndcg@10", "text_retention", "image_retention",
                 "probe_text_theme", "probe_image_pattern", "weak_image_share", "positive_score_ratio",
                 "weight_grad_ratio")


@dataclass
class Job:
    """Everything one worker process needs for one (row, seed)."""

    row: Row
    seed: int
    epochs: int
    data_path: str
    dataset: str
    settings: dict
    config_files: List[str] = field(default_factory=list)
    weight_grad_every: int = 10


# ------------------------------------------------------------------------------------------ one run

def linear_probe(features, labels, folds: int = 5, ridge: float = 1.0, seed: int = 0) -> float:
    """Cross-validated accuracy of a ridge-regression one-vs-rest classifier of ``labels`` from ``features``.

    Features are standardised on each training fold; the classifier is closed-form least squares on one-hot
    targets with an L2 penalty ``ridge`` (so the number is deterministic and needs no solver settings). Rows of
    all-zero features (an absent modality) are not items of that modality: NaN if every row is zero.
    """
    import numpy as np

    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels)
    keep = np.abs(x).sum(axis=1) > 0
    x, y = x[keep], y[keep]
    if len(y) < folds or len(set(y.tolist())) < 2:
        return math.nan
    classes = np.unique(y)
    order = np.random.default_rng(seed).permutation(len(y))
    hits = 0
    for fold in range(folds):
        test = order[fold::folds]
        train = np.setdiff1d(order, test)
        mean, std = x[train].mean(0), x[train].std(0) + 1e-8
        xt = np.hstack([(x[train] - mean) / std, np.ones((len(train), 1))])
        targets = (y[train][:, None] == classes[None, :]).astype(np.float64)
        weights = np.linalg.solve(xt.T @ xt + ridge * np.eye(xt.shape[1]), xt.T @ targets)
        xs = np.hstack([(x[test] - mean) / std, np.ones((len(test), 1))])
        hits += int((classes[np.argmax(xs @ weights, axis=1)] == y[test]).sum())
    return hits / len(y)


def probe_accuracies(model, dataset, data_path: str, dataset_name: str) -> Dict[str, float]:
    """Linear-probe accuracy of each planted attribute from each modality's item embeddings (synthetic only)."""
    from dataset_tools.synthetic import read_latent

    try:
        latent = read_latent(os.path.join(data_path, dataset_name), dataset_name)["items"]
    except FileNotFoundError:
        return {}
    tokens = list(dataset.field2id_token[dataset.iid_field][1:])  # row 0 is RecBole's padding item
    catalog = model.catalog_embeddings()
    results = {}
    for modality, used in (("text", model.use_text), ("image", model.use_image)):
        for attribute, key in (("theme", "text"), ("pattern", "image")):
            values = catalog[modality][1:].float().cpu().numpy() if used else None
            labels = [latent[t][key] for t in tokens]
            results[f"probe_{modality}_{attribute}"] = linear_probe(values, labels) if used else math.nan
    return results


def weight_gradient_ratio(loss, inputs, params) -> float:
    """``||J_T^T g_T|| / ||J_V^T g_V||``: the norm of the gradient that reaches the trainable weights through the
    text branch (user and item text embeddings) over the one through the image branch.

    The embedding-level ratio of the model's diagnostics is exactly 1 under plain fused InfoNCE
    (``losses.detector.modality_gradient_norms``); this one sees how much each branch moves the shared weights.
    Two extra backward passes through the encoder, hence sampled every few steps.
    """
    import torch

    user_text, item_text, user_image, item_image = inputs
    if user_image is None or user_text is None:
        return math.nan
    embeddings = [user_text, item_text, user_image, item_image]
    grads = torch.autograd.grad(loss, embeddings, retain_graph=True)
    norms = []
    for outputs, outgrads in ((embeddings[:2], grads[:2]), (embeddings[2:], grads[2:])):
        pgrads = torch.autograd.grad(outputs, params, grad_outputs=outgrads, retain_graph=True, allow_unused=True)
        norms.append(math.sqrt(sum(float(g.float().pow(2).sum()) for g in pgrads if g is not None)))
    return norms[0] / norms[1] if norms[1] > 0 else math.nan


def _sample_weight_gradients(model, every: int) -> List[float]:
    """Wrap ``model.calculate_loss`` so that every ``every``-th training step also measures the weight-gradient
    ratio (appended to the returned list)."""
    samples: List[float] = []
    if every <= 0:
        return samples
    captured = {}
    objective_forward = model.objective.forward

    def capture(user_text, user_image, user_image_mask, item_text, item_image, item_image_mask, **kwargs):
        captured["inputs"] = (user_text, item_text, user_image, item_image)
        return objective_forward(user_text, user_image, user_image_mask, item_text, item_image, item_image_mask,
                                 **kwargs)

    model.objective.forward = capture
    params = [p for p in model.parameters() if p.requires_grad]
    calculate_loss, steps = model.calculate_loss, [0]

    def sampled(interaction):
        captured.clear()
        wpcl, crtr = calculate_loss(interaction)
        if model.training and steps[0] % every == 0 and captured:
            samples.append(weight_gradient_ratio(wpcl + crtr, captured["inputs"], params))
        steps[0] += 1
        return wpcl, crtr

    model.calculate_loss = sampled
    return samples


def _evaluate(trainer, model, data) -> Dict[str, float]:
    """Fused, text-only and image-only metrics of the current weights (NaN for a modality the model lacks)."""
    result = trainer.evaluate(data, load_best_model=False)
    by_mode = trainer.modality_results or {"fused": result, ("text-only" if model.use_text else "image-only"): result}
    return {f"{mode}_{metric}": float(by_mode[SCORE_MODES[mode]][metric]) if SCORE_MODES[mode] in by_mode else math.nan
            for mode in MODES for metric in METRICS}


def run_job(job: Job) -> dict:
    """Train (unless ``untrained``) and evaluate one row for one seed; returns its measurements."""
    started = time.perf_counter()
    workdir = tempfile.mkdtemp(prefix="run-", dir=job.data_path)
    cwd = os.getcwd()
    os.chdir(workdir)  # RecBole writes log/ and log_tensorboard/ under the working directory
    try:
        return _run_in_workdir(job, workdir, started)
    finally:
        os.chdir(cwd)  # with --jobs 1 the run shares the command's process


def _run_in_workdir(job: Job, workdir: str, started: float) -> dict:
    import torch

    import recbole_vlm2rec  # noqa: F401  (registers the models)
    from recbole.config import Config
    from recbole.data import create_dataset, data_preparation
    from recbole.utils import init_seed

    from recbole_vlm2rec.models.vlm2rec import VLM2Rec
    from recbole_vlm2rec.trainer import VLM2RecTrainer

    config_dict = dict(job.settings)
    config_dict.update({
        "data_path": job.data_path, "checkpoint_dir": os.path.join(workdir, "saved"), "seed": job.seed,
        "tiny_seed": job.seed, "epochs": max(job.epochs, 1), "beta": job.row.beta, "lambda": job.row.lambda_,
        "modalities": list(job.row.modalities), **dict(job.row.settings),
    })
    config = Config(model="VLM2Rec", dataset=job.dataset, config_dict=config_dict,
                    config_file_list=[os.path.join(REPO, "properties", "dataset", "amazon-template.yaml"),
                                      *job.config_files])
    torch.set_num_threads(1)
    init_seed(config["seed"], config["reproducibility"])
    dataset = create_dataset(config)
    train_data, valid_data, test_data = data_preparation(config, dataset)
    init_seed(config["seed"], config["reproducibility"])  # same backbone and data order for every row
    model = VLM2Rec(config, train_data._dataset).to(config["device"])
    weight_ratios = _sample_weight_gradients(model, job.weight_grad_every if job.row.train else 0)
    trainer = VLM2RecTrainer(config, model)

    measured = {"epochs": []}
    if job.row.train:
        trainer.eval_collector.data_collect(train_data)  # as fit does
        for epoch in range(job.epochs):  # fit's loop without early stopping or checkpoints
            trainer._train_epoch(train_data, epoch)
            diagnostics = model.diagnostics.summary()
            measured["epochs"].append({**{f"valid_{k}": v for k, v in _evaluate(trainer, model, valid_data).items()},
                                       **{k: diagnostics[k] for k in ("weak_image_share", "positive_score_ratio",
                                                                      "accuracy_text", "accuracy_image",
                                                                      "loss_text", "loss_image")}})
    if not measured["epochs"]:
        measured.update({f"valid_{k}": v for k, v in _evaluate(trainer, model, valid_data).items()})
    else:  # the last epoch's validation is the final model's
        measured.update({k: v for k, v in measured["epochs"][-1].items() if k.startswith("valid_")})
    measured.update({f"test_{k}": v for k, v in _evaluate(trainer, model, test_data).items()})
    measured.update(probe_accuracies(model, train_data._dataset, job.data_path, job.dataset))
    last = measured["epochs"][-1] if measured["epochs"] else {}
    both = job.row.train and len(job.row.modalities) == 2
    measured["weak_image_share"] = last.get("weak_image_share", math.nan) if both else math.nan
    measured["positive_score_ratio"] = last.get("positive_score_ratio", math.nan) if both else math.nan
    ratios = [r for r in weight_ratios if not math.isnan(r)]
    measured["weight_grad_ratio"] = statistics.mean(ratios) if ratios else math.nan
    measured["run_s"] = time.perf_counter() - started
    return {"row": job.row.name, "seed": job.seed, **measured}


# --------------------------------------------------------------------------------------- the whole run

def _log(line: str) -> None:
    print(line, flush=True)  # progress of a long run, also when stdout is a file


def run_all(jobs: List[Job], workers: int, log=_log) -> List[dict]:
    """Run every job (in ``workers`` processes when > 1); results in job order."""
    if workers <= 1:
        results = []
        for job in jobs:
            results.append(run_job(job))
            log(_progress_line(results[-1], len(results), len(jobs)))
        return results
    context = multiprocessing.get_context("spawn")  # fresh interpreters: no torch state shared by fork
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context, initializer=_worker_init) as pool:
        futures = {pool.submit(run_job, job): n for n, job in enumerate(jobs)}
        results: List[Optional[dict]] = [None] * len(jobs)
        for done, future in enumerate(concurrent.futures.as_completed(futures), 1):
            results[futures[future]] = future.result()
            log(_progress_line(results[futures[future]], done, len(jobs)))
    return results


def _worker_init() -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, REPO)


def _progress_line(result: dict, done: int, total: int) -> str:
    return (f"[{done}/{total}] seed {result['seed']} {result['row']}: test NDCG@10 fused "
            f"{result['test_fused_ndcg@10']:.4f} text {result['test_text_only_ndcg@10']:.4f} image "
            f"{result['test_image_only_ndcg@10']:.4f} ({result['run_s']:.0f} s)")


def _stats(values: List[float]) -> dict:
    finite = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    mean = statistics.mean(finite) if finite else None
    stderr = statistics.stdev(finite) / math.sqrt(len(finite)) if len(finite) > 1 else None
    return {"values": [v if isinstance(v, (int, float)) and math.isfinite(v) else None for v in values],
            "mean": mean, "stderr": stderr}


def summarise(results: List[dict], seeds: List[int]) -> Tuple[dict, dict]:
    """``(rows, selection)``: per row, per metric, the values over seeds (seed order) with mean and standard
    error; retention per seed against the uni-modal rows; the sweep point selected on validation."""
    by_row: Dict[str, Dict[int, dict]] = {}
    for r in results:
        by_row.setdefault(r["row"], {})[r["seed"]] = r
    for name, per_seed in by_row.items():
        for seed, r in per_seed.items():
            for modality in ("text", "image"):
                alone = by_row.get(f"{modality} alone", {}).get(seed)
                own = r[f"test_{modality}_only_ndcg@10"]
                reference = alone[f"test_{modality}_only_ndcg@10"] if alone else math.nan
                r[f"{modality}_retention"] = own / reference if reference and math.isfinite(reference) else math.nan

    candidates = [row.name for row in (*ROWS, *SWEEP)
                  if row.beta > 0 and row.lambda_ > 0 and not row.settings and row.name in by_row]
    selection = {}
    if candidates:
        scores = {name: statistics.mean(by_row[name][s][SELECTION_METRIC] for s in seeds) for name in candidates}
        chosen = max(candidates, key=lambda name: (scores[name], -candidates.index(name)))
        by_row[SELECTED] = by_row[chosen]
        row = next(r for r in (*ROWS, *SWEEP) if r.name == chosen)
        selection = {"criterion": f"{SELECTION_METRIC}, mean over seeds", "candidates": scores, "selected": chosen,
                     "beta": row.beta, "lambda": row.lambda_}

    metrics = [k for k in results[0] if k not in ("row", "seed", "epochs")]
    metrics = [k[5:] if k.startswith("test_") else k for k in metrics]  # test metrics unprefixed, as asked
    rows = {}
    for name, per_seed in by_row.items():
        rows[name] = {}
        for metric in dict.fromkeys(metrics):
            key = metric if metric in per_seed[seeds[0]] else f"test_{metric}"
            rows[name][metric] = _stats([per_seed[s].get(key, math.nan) for s in seeds])
        rows[name]["valid_curve"] = _curve(per_seed, by_row.get("untrained"), seeds)
    return rows, selection


def _curve(per_seed: Dict[int, dict], untrained: Optional[Dict[int, dict]], seeds: List[int]) -> dict:
    """Per epoch, per modality: the validation NDCG@10 (mean and standard error over seeds). Epoch 0 is the
    untrained row of the same seed (the same backbone initialisation), when it was run."""
    def point(result, mode):
        return result[f"valid_{mode}_ndcg@10"]

    curve = {}
    for mode in MODES:
        epochs = [[point(per_seed[s]["epochs"][e], mode) for s in seeds] for e in range(len(per_seed[seeds[0]]["epochs"]))]
        if untrained and epochs:
            epochs.insert(0, [point(untrained[s], mode) for s in seeds])
        curve[mode] = [_stats(values) for values in epochs]
    return curve


def learnability(rows: dict, ceilings: Optional[dict], split: str = "test") -> dict:
    """Per modality, how far training on that modality alone gets from the untrained model (issue 12's
    "the image path can learn"): per seed, ``alone_over_untrained`` = NDCG@10 of ``<modality> alone`` over the
    untrained row's, and, where the catalog has planted attributes, ``ceiling_over_untrained`` (the most that
    ratio can be for a model that knows the attribute and nothing else), ``alone_over_ceiling`` and
    ``gap_closed`` = (alone - untrained) / (ceiling - untrained). Modalities whose rows were not run are left out.
    """
    result = {}
    for modality in ("text", "image"):
        metric = f"{modality}_only_ndcg@10"
        if f"{modality} alone" not in rows or "untrained" not in rows:
            continue
        alone = rows[f"{modality} alone"][metric]["values"]
        untrained = rows["untrained"][metric]["values"]
        pairs = list(zip(alone, untrained))
        entry = {"alone_over_untrained": _stats([a / u if a is not None and u else math.nan for a, u in pairs])}
        if ceilings:
            ceiling = ceilings[split][modality]["ndcg@10"]
            entry.update({
                "ceiling_ndcg@10": ceiling,
                "ceiling_over_untrained": _stats([ceiling / u if u else math.nan for _, u in pairs]),
                "alone_over_ceiling": _stats([a / ceiling if a is not None else math.nan for a, _ in pairs]),
                "gap_closed": _stats([(a - u) / (ceiling - u) if a is not None and u is not None and ceiling != u
                                      else math.nan for a, u in pairs]),
            })
        result[modality] = entry
    return result


def learnability_lines(report: dict) -> List[str]:
    """One line per modality of :func:`learnability`, plus the ceilings of every scorer."""
    lines = []
    if report.get("ceilings"):
        test = report["ceilings"]["test"]
        lines.append("attribute ceilings, expected NDCG@10 (knows the last history item's attributes, ties at "
                     "random): " + ", ".join(f"{k} {v['ndcg@10']:.4f}" for k, v in test.items()))
    for modality, entry in report["learnability"].items():
        line = f"{modality} alone / untrained {_cell(entry['alone_over_untrained'], '.2f')}"
        if "ceiling_ndcg@10" in entry:
            line += (f"; ceiling {entry['ceiling_ndcg@10']:.4f} = {_cell(entry['ceiling_over_untrained'], '.2f')}"
                     f" x untrained; alone reaches {_cell(entry['alone_over_ceiling'], '.2f')} of the ceiling and "
                     f"closes {_cell(entry['gap_closed'], '.2f')} of the untrained-to-ceiling gap")
        lines.append(line)
    return lines


# --------------------------------------------------------------------------------------------- output

def _cell(stat: dict, spec: str = ".4f") -> str:
    if stat["mean"] is None:
        return "n/a"
    if stat["stderr"] is None:
        return format(stat["mean"], spec)
    return f"{format(stat['mean'], spec)} ± {format(stat['stderr'], spec)}"


TABLE_HEAD = ("row", "fused NDCG@10", "text-only", "image-only", "text retention", "image retention",
              "probe text→theme", "probe image→pattern", "weak=image", "pos T/V", "weight-grad T/V")


def table_lines(rows: dict, prefix: str = "", markdown: bool = False) -> List[str]:
    """The table, plain or Markdown: every test metric of TABLE_METRICS, or with ``prefix='valid_'`` the
    validation NDCG@10 columns only."""
    metrics_shown = [m for m in TABLE_METRICS if not prefix or m.endswith("ndcg@10")]
    head = [TABLE_HEAD[0]] + [TABLE_HEAD[1 + TABLE_METRICS.index(m)] for m in metrics_shown]
    body = []
    for name, metrics in rows.items():
        cells = [name]
        for metric in metrics_shown:
            missing = {"mean": None}  # probes on a dataset without planted attributes
            cells.append(_cell(metrics.get(prefix + metric, missing), ".4f" if "ndcg" in metric else ".2f"))
        body.append(cells)
    if markdown:
        return (["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
                + ["| " + " | ".join(r) + " |" for r in body])
    everything = [head] + body
    widths = [max(len(r[c]) for r in everything) for c in range(len(head))]
    return [" | ".join(c.ljust(w) if k == 0 else c.rjust(w) for k, (c, w) in enumerate(zip(r, widths)))
            for r in everything]


def plot(out: str, rows: dict, seeds: List[int]) -> List[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = list(rows)
    colours = {"text_only": "tab:blue", "image_only": "tab:orange", "fused": "tab:green"}
    fig, ax = plt.subplots(figsize=(1.3 * len(names) + 2, 4.2))
    width = 0.27
    for k, mode in enumerate(("text_only", "image_only", "fused")):
        stats = [rows[n][f"{mode}_ndcg@10"] for n in names]
        means = [s["mean"] if s["mean"] is not None else 0.0 for s in stats]
        errors = [s["stderr"] or 0.0 for s in stats]
        ax.bar(np.arange(len(names)) + (k - 1) * width, means, width, yerr=errors, capsize=3, color=colours[mode],
               label=mode.replace("_", "-"))
    ax.set_xticks(np.arange(len(names)), [n.replace(" lambda", "\nlambda").replace(" (", "\n(") for n in names],
                  fontsize=7)
    ax.set_ylabel("test NDCG@10 (full ranking)")
    ax.set_title(f"Per-modality scoring (mean ± s.e. over seeds {seeds})", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    bars = os.path.join(out, "modality_metrics.png")
    fig.savefig(bars, dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for axis, name in zip(axes, ("plain", "VLM2Rec")):
        curve = rows.get(name, {}).get("valid_curve")
        if not curve:
            continue
        for mode in MODES:
            means = np.array([p["mean"] if p["mean"] is not None else np.nan for p in curve[mode]])
            errors = np.array([p["stderr"] or 0.0 for p in curve[mode]])
            x = np.arange(len(means))  # epoch 0: untrained
            axis.errorbar(x, means, yerr=errors, marker="o", capsize=3, color=colours[mode],
                          label=mode.replace("_", "-"))
        axis.set_title(name, fontsize=10)
        axis.set_xlabel("epoch")
        axis.set_xticks(np.arange(len(curve["fused"])))
    axes[0].set_ylabel("validation NDCG@10")
    axes[0].legend(fontsize=8)
    fig.suptitle("Per-modality validation NDCG@10 over epochs (mean ± s.e. over seeds)", fontsize=10)
    fig.tight_layout()
    curves = os.path.join(out, "curves.png")
    fig.savefig(curves, dpi=110)
    plt.close(fig)
    return [bars, curves]


def write_outputs(out: str, report: dict, plots: bool = True) -> List[str]:
    os.makedirs(out, exist_ok=True)
    rows = report["rows"]
    json_path = os.path.join(out, "results.json")
    tmp = json_path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=1, allow_nan=False)
    os.replace(tmp, json_path)
    md = [f"# Modality collapse\n\n{report['header']}\n", "## Test split (mean ± standard error over seeds)\n",
          *table_lines(rows, markdown=True), "", "## Validation split, NDCG@10\n",
          *table_lines(rows, "valid_", markdown=True), ""]
    if report.get("selection"):
        sel = report["selection"]
        md.append(f"Selected on validation ({sel['criterion']}): {sel['selected']} "
                  f"(beta {sel['beta']}, lambda {sel['lambda']}); candidates: "
                  + ", ".join(f"{k} {v:.4f}" for k, v in sel["candidates"].items()) + "\n")
    if report.get("oracle"):
        md.append("Oracle Hit@10 of the catalog (scorers that know the planted attributes): "
                  + ", ".join(f"{k} {v:.3f}" for k, v in report["oracle"].items()) + "\n")
    if report.get("ceilings"):
        md += ["## Attribute ceilings and learnability (test split)\n", *learnability_lines(report), ""]
    md_path = os.path.join(out, "results.md")
    with open(md_path, "w", encoding="utf-8") as handle:
        handle.write("\n".join(md))
    paths = [json_path, md_path]
    if plots:
        paths += plot(out, rows, report["seeds"])
    return paths


# ----------------------------------------------------------------------------------------------- main

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default=None, help="comma-separated seeds (default 0,1,2; --quick: 0)")
    parser.add_argument("--epochs", type=int, default=None, help=f"epochs per trained row (default {DEFAULT_EPOCHS}; "
                                                                    "--quick: 1)")
    parser.add_argument("--quick", action="store_true", help="smoke test: 1 seed, 150 users, 1 epoch, one sweep point")
    parser.add_argument("--rows", default=None,
                        help="comma-separated subset of the rows (default: all; the sweep rows are 'sweep ...')")
    parser.add_argument("--image-colours", choices=("dark-on-light", "random"), default=None,
                        help="synthetic catalog: override the spec's pattern colours (random: the demo's, which "
                             "hide the pattern from the vision tower)")
    parser.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "modality_collapse"))
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="parallel runs (1 thread each)")
    parser.add_argument("--dataset", default=None, help="a converted dataset instead of the synthetic catalog")
    parser.add_argument("--data_path", default=None, help="directory holding --dataset")
    parser.add_argument("--vlm_name_or_path", default=None, help="backbone (default: the run's settings)")
    parser.add_argument("--config_files", default="", help="space-separated YAML files (own dataset)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--weight-grad-every", type=int, default=10,
                        help="measure the weight-gradient ratio every N steps (0: never; 2 extra backwards)")
    parser.add_argument("--data-dir", default=None, help="build the synthetic catalog here (default: a temp dir)")
    args = parser.parse_args(argv)
    args.out = os.path.abspath(args.out)
    args.seeds = [int(s) for s in (args.seeds or ("0" if args.quick else ",".join(map(str, DEFAULT_SEEDS)))).split(",")
                  if s.strip()]
    args.epochs = args.epochs if args.epochs is not None else (1 if args.quick else DEFAULT_EPOCHS)
    if not args.seeds or args.epochs < 1 or args.jobs < 1:
        parser.error("need at least one seed, --epochs >= 1 and --jobs >= 1")
    if args.dataset and not args.data_path:
        parser.error("--dataset needs --data_path (the directory that holds <dataset>/<dataset>.inter)")
    if args.dataset and not os.path.isfile(os.path.join(args.data_path, args.dataset, f"{args.dataset}.inter")):
        parser.error(f"no {os.path.join(args.data_path, args.dataset, args.dataset + '.inter')}: convert the catalog "
                     "first (vlm2rec-data amazon ...)")
    for path in args.config_files.split():
        if not os.path.isfile(path):
            parser.error(f"--config_files: no file {path}")
    # every run works in a folder of its own: paths are the caller's
    args.config_files = " ".join(os.path.abspath(path) for path in args.config_files.split())
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from dataset_tools.synthetic import attribute_ceilings, build_synthetic, oracle_hit_rates

    started = time.perf_counter()
    rows = list(ROWS) + list(SWEEP[:1] if args.quick else SWEEP)
    if args.rows:
        wanted = [name.strip() for name in args.rows.split(",") if name.strip()]
        unknown = [name for name in wanted if name not in {row.name for row in rows}]
        if unknown:
            sys.exit(f"modality_collapse.py: error: unknown rows {unknown}; choose from {[row.name for row in rows]}")
        rows = [row for row in rows if row.name in wanted]
    device = {"gpu_id": "0" if args.device == "cuda" else ""}
    with tempfile.TemporaryDirectory(prefix="modality-collapse-", dir=args.data_dir) as root:
        if args.dataset:
            data_path, dataset, settings, spec = os.path.abspath(args.data_path), args.dataset, {}, None
            oracle = ceilings = None
        else:
            spec = QUICK_SPEC if args.quick else COLLAPSE_SPEC
            if args.image_colours:
                spec = dataclasses.replace(spec, image_colours=args.image_colours)
            data_path, dataset, settings = root, SYNTHETIC_DATASET, dict(SYNTHETIC_SETTINGS)
            build_synthetic(root, dataset, spec, kcore=3 if args.quick else 5, image_format="png", progress=False)
            oracle = oracle_hit_rates(os.path.join(root, dataset), dataset, k=10)
            ceilings = attribute_ceilings(os.path.join(root, dataset), dataset, k=10)
            if args.quick:
                settings.update(train_batch_size=32, image_size=28)
        settings.update(EVALUATION_SETTINGS, **device)
        if args.vlm_name_or_path:
            settings["vlm_name_or_path"] = args.vlm_name_or_path
        jobs = [Job(row, seed, args.epochs, data_path, dataset, settings, args.config_files.split(),
                    args.weight_grad_every) for seed in args.seeds for row in rows]
        _log(f"{len(jobs)} runs ({len(rows)} rows x {len(args.seeds)} seeds), {args.jobs} at a time")
        results = run_all(jobs, args.jobs)
    table_rows, selection = summarise(results, args.seeds)
    runtime = time.perf_counter() - started
    header = (f"Dataset {dataset}" + (f" (synthetic: {asdict(spec)})" if spec else f" under {data_path}")
              + f". Settings: {json.dumps(settings, sort_keys=True)}. {args.epochs} epochs per trained row, final "
              f"model evaluated (no best-epoch selection), full ranking. Seeds {args.seeds}. "
              f"Runtime {runtime / 60:.1f} min ({args.jobs} parallel runs).")
    report = {"seeds": args.seeds, "rows": table_rows, "selection": selection, "oracle": oracle,
              "ceilings": ceilings, "learnability": learnability(table_rows, ceilings),
              "spec": asdict(spec) if spec else None, "settings": settings, "epochs": args.epochs,
              "runtime_s": round(runtime, 1), "header": header}
    paths = write_outputs(args.out, report)
    print("\n" + header)
    if oracle:
        print("oracle Hit@10: " + ", ".join(f"{k} {v:.3f}" for k, v in oracle.items()))
    if report["learnability"]:
        print("\nlearnability (test split)\n" + "\n".join(learnability_lines(report)))
    print("\ntest split (mean ± standard error over seeds)")
    print("\n".join(table_lines(table_rows)))
    print("\nvalidation split, NDCG@10")
    print("\n".join(table_lines(table_rows, "valid_")))
    if selection:
        print(f"\nselected on validation: {selection['selected']}")
    print("\nwritten: " + ", ".join(paths))


if __name__ == "__main__":
    main()
