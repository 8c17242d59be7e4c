"""Modality collapse on the synthetic catalog: plain contrastive fine-tuning vs WPCL, CRTR and full VLM2Rec.

Issue 7, item 2. Builds the synthetic multimodal catalog of the demo (``dataset_tools.demo.DEMO_SPEC``: 360
items, 1,000 users, text signal = image signal = 1.0, unchanged) in a temporary directory, then, for each
seed, trains one VLM2Rec per setting through RecBole's own pieces (Config -> dataset -> VLM2Rec ->
VLM2RecTrainer.fit), with the same seed, data order, backbone initialisation and number of epochs:

    untrained          no training step (the random tiny backbone as built)
    plain              beta 0,   lambda 0     plain in-batch contrastive fine-tuning (InfoNCE on fused scores)
    +WPCL              beta 0.2, lambda 0     weak-modality penalised contrastive loss only
    +CRTR              beta 0,   lambda 0.1   cross-modal relational topology regularisation only
    VLM2Rec            beta 0.2, lambda 0.1   both (the demo's documented values for this backbone)
    VLM2Rec-beta1      beta 1.0, lambda 0.1   optional extra row (--settings): the model default, which
                                              collapsed the tiny backbone on the demo

Everything else is the demo preset (``properties/quick_start/VLM2Rec_on_vlm2rec-demo.yaml``), pinned here
explicitly: tiny-qwen2-vl, full fine-tuning, lr 1e-3, 56 px images, title text (32 tokens), 5-item
histories, batch 64, fp32, one torch thread, CPU; relative WPCL, tau 0.05, loss-criterion weak detector.
Each setting is evaluated once, after its last epoch (no best-epoch selection, no early stopping), on the
validation and the test split with full ranking, with fused, text-only and image-only scores
(``VLM2RecTrainer.modality_results``). During training every step's ``L^T``, ``L^V``, weak modality and
gradient-norm ratio ``||dL/dE^T|| / ||dL/dE^V||`` (of that setting's own loss) is recorded from the
model's ``diagnostics``.

    python benchmarks/modality_collapse.py                      # 1 seed, 2 epochs (~8-10 min, 2-core CPU)
    python benchmarks/modality_collapse.py --seeds 0,1,2 --settings untrained,plain,+WPCL,+CRTR,VLM2Rec,VLM2Rec-beta1

Seed ``s`` sets RecBole's ``seed`` (data order, dropout) and ``tiny_seed`` (the backbone's random
initialisation) to ``s``; the catalog itself stays DEMO_SPEC's (seed 2026) for every seed.

Writes to ``--out`` (default ``bench_out/modality_collapse``): ``results.csv`` (one row per seed and
setting), ``results.md`` (table, mean +- std over seeds, plus the oracle hit rates of the catalog),
``per_step.csv``, ``modality_metrics.png`` and ``grad_ratio.png``; prints the table.
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Dict, List, Optional

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
DATASET = "modality-collapse-synth"


@dataclass(frozen=True)
class Setting:
    name: str
    beta: float
    lambda_: float
    train: bool = True


SETTINGS = {
    s.name: s
    for s in (
        Setting("untrained", 0.0, 0.0, train=False),
        Setting("plain", 0.0, 0.0),
        Setting("+WPCL", 0.2, 0.0),
        Setting("+CRTR", 0.0, 0.1),
        Setting("VLM2Rec", 0.2, 0.1),
        Setting("VLM2Rec-beta1", 1.0, 0.1),
    )
}
DEFAULT_SETTINGS = ("untrained", "plain", "+WPCL", "+CRTR", "VLM2Rec")

# The demo preset (properties/quick_start/VLM2Rec_on_vlm2rec-demo.yaml), pinned so that the benchmark does
# not change when the preset does, plus what a fixed-length comparison needs.
DEMO_SETTINGS = {
    "vlm_name_or_path": "tiny-qwen2-vl",
    "vlm_dtype": "fp32",
    "gradient_checkpointing": False,
    "finetune": "full",
    "learning_rate": 0.001,
    "image_size": 56,
    "max_text_tokens": 32,
    "item_text_fields": ["title"],
    "max_history_items": 5,
    "train_batch_size": 64,
    "gpu_id": "",
    "torch_num_threads": 1,
    "tau": 0.05,
    "wpcl_form": "relative",
    "weak_criterion": "loss",
    "crtr_relation": "item",
    "grad_norm_diagnostics": True,
    "modality_dropout_eval": True,
    "export_embeddings": False,
    "show_progress": False,
    "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "mode": "full", "group_by": "user"},
    "metrics": ["Hit", "NDCG"],
    "topk": [10],
    "valid_metric": "NDCG@10",
}
MODES = ("fused", "text-only", "image-only")
METRICS = ("ndcg@10", "hit@10")


def build_catalog(root: str, spec=None, kcore: int = 5) -> str:
    """The synthetic catalog (DEMO_SPEC unless ``spec``) as ``root/DATASET``; returns its directory."""
    from dataset_tools.demo import DEMO_SPEC
    from dataset_tools.synthetic import build_synthetic

    build_synthetic(root, DATASET, spec or DEMO_SPEC, kcore=kcore, image_format="png", progress=False)
    return os.path.join(root, DATASET)


class _Recorder:
    """Wraps the model's ``calculate_loss``: after each training step's loss, reads what the objective
    put into ``model.diagnostics`` (through a recording ``ModalityDiagnostics``) and the two loss terms."""

    def __init__(self, model, setting: str, seed: int, param_grad_every: int = 0):
        import torch

        from recbole_vlm2rec.diagnostics import ModalityDiagnostics

        recorder = self
        self.rows: List[dict] = []
        self.setting, self.seed, self.epoch = setting, seed, 0
        self.inputs = None

        class Recording(ModalityDiagnostics):
            def update(self, loss_text=None, loss_image=None, weak=None, grad_norm_ratio=None,
                       positive_score_ratio=None):
                super().update(loss_text, loss_image, weak, grad_norm_ratio, positive_score_ratio)
                recorder.rows.append({
                    "seed": recorder.seed, "setting": recorder.setting, "epoch": recorder.epoch,
                    "step": len(recorder.rows),
                    "loss_text": _f(loss_text), "loss_image": _f(loss_image), "weak": weak or "",
                    "grad_ratio": _f(grad_norm_ratio), "positive_score_ratio": _f(positive_score_ratio),
                })

        model.diagnostics = Recording()
        original = model.calculate_loss
        objective_forward = model.objective.forward

        def capture(user_text, user_image, user_image_mask, item_text, item_image, item_image_mask, **kwargs):
            self.inputs = (user_text, item_text, user_image, item_image)
            return objective_forward(user_text, user_image, user_image_mask, item_text, item_image,
                                     item_image_mask, **kwargs)

        model.objective.forward = capture
        params = [p for p in model.parameters() if p.requires_grad]

        def calculate_loss(interaction):
            self.inputs = None
            wpcl, crtr = original(interaction)
            if self.rows:
                row = self.rows[-1]
                row["loss_wpcl"] = float(wpcl.detach())
                row["loss_crtr_weighted"] = float(crtr.detach())
                row["param_grad_ratio"] = math.nan
                if param_grad_every and (len(self.rows) - 1) % param_grad_every == 0 and self.inputs:
                    row["param_grad_ratio"] = param_gradient_ratio(wpcl + crtr, self.inputs, params)
            return wpcl, crtr

        model.calculate_loss = calculate_loss


def param_gradient_ratio(loss, inputs, params) -> float:
    """``||J_T^T g_T|| / ||J_V^T g_V||``: the norm of the gradient that reaches the trainable weights through
    the text branch (user and item text embeddings) over the one through the image branch.

    ``||dL/dE^T|| / ||dL/dE^V||`` (the model's diagnostic) is taken at the encoder's L2-normalised outputs;
    with external fusion ``normalize(t + v)`` the fused loss sends ``g`` orthogonal to ``t + v``, and
    ``||P_t g|| = ||P_v g||`` for unit ``t`` and ``v``: that ratio is exactly 1 for plain contrastive
    training whatever the modalities do. This one sees how much each branch moves the shared weights.
    Costs two extra backward passes through the encoder (hence sampled every few steps).
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


def _f(value) -> float:
    return math.nan if value is None else float(value)


def run_setting(root: str, setting: Setting, seed: int, epochs: int, overrides: Optional[dict] = None,
                param_grad_every: int = 10):
    """Train (unless ``untrained``) and evaluate one setting; returns (result row, per-step rows)."""
    import torch

    import recbole_vlm2rec  # noqa: F401  (registers the models)
    from recbole.config import Config
    from recbole.data import create_dataset, data_preparation
    from recbole.utils import init_seed

    from recbole_vlm2rec.models.vlm2rec import VLM2Rec
    from recbole_vlm2rec.trainer import VLM2RecTrainer

    config_dict = dict(DEMO_SETTINGS)
    config_dict.update({
        "data_path": root,
        # shared: the vision cache is keyed by image, size and backbone, so every setting reuses it
        "checkpoint_dir": os.path.join(root, "saved"),
        "seed": seed,
        "tiny_seed": seed,
        "reproducibility": True,
        "epochs": epochs,
        "beta": setting.beta,
        "lambda": setting.lambda_,
    })
    config_dict.update(overrides or {})
    config = Config(
        model="VLM2Rec",
        dataset=DATASET,
        config_file_list=[os.path.join(REPO, "properties", "dataset", "amazon-template.yaml")],
        config_dict=config_dict,
    )
    torch.set_num_threads(1)
    init_seed(config["seed"], config["reproducibility"])
    dataset = create_dataset(config)
    train_data, valid_data, test_data = data_preparation(config, dataset)
    init_seed(config["seed"], config["reproducibility"])  # same backbone and data order for every setting
    model = VLM2Rec(config, train_data._dataset).to(config["device"])
    recorder = _Recorder(model, setting.name, seed, param_grad_every)
    trainer = VLM2RecTrainer(config, model)

    train_s = 0.0
    if setting.train:
        start = time.perf_counter()
        trainer.eval_collector.data_collect(train_data)  # as fit does
        for epoch in range(epochs):  # fit's training loop without validation, checkpoints or early stopping
            recorder.epoch = epoch
            trainer._train_epoch(train_data, epoch)
        train_s = time.perf_counter() - start

    row = {"seed": seed, "setting": setting.name, "beta": setting.beta, "lambda": setting.lambda_,
           "epochs": epochs if setting.train else 0, "steps": len(recorder.rows), "train_s": round(train_s, 1)}
    start = time.perf_counter()
    for split, data in (("valid", valid_data), ("test", test_data)):
        trainer.evaluate(data, load_best_model=False)
        for mode in MODES:
            for metric in METRICS:
                row[f"{split}_{mode}_{metric}"] = float(trainer.modality_results[mode][metric])
    row["eval_s"] = round(time.perf_counter() - start, 1)
    row.update(summarise_steps(recorder.rows))
    return row, recorder.rows


def summarise_steps(rows: List[dict]) -> Dict[str, float]:
    """Means over all training steps (NaN without steps), and over the last epoch for the losses."""
    ratios = [r["grad_ratio"] for r in rows if not math.isnan(r["grad_ratio"])]
    pratios = [r["param_grad_ratio"] for r in rows if not math.isnan(r.get("param_grad_ratio", math.nan))]
    weak = [r["weak"] for r in rows if r["weak"]]
    last_epoch = max((r["epoch"] for r in rows), default=0)
    last = [r for r in rows if r["epoch"] == last_epoch]

    def mean(values):
        values = [v for v in values if not math.isnan(v)]
        return sum(values) / len(values) if values else math.nan

    return {
        "grad_ratio_mean": mean(ratios),
        "grad_ratio_median": statistics.median(ratios) if ratios else math.nan,
        "grad_ratio_geomean": math.exp(mean([math.log(r) for r in ratios if r > 0])) if ratios else math.nan,
        "param_grad_ratio_mean": mean(pratios),
        "param_grad_ratio_first": pratios[0] if pratios else math.nan,
        "param_grad_ratio_last": pratios[-1] if pratios else math.nan,
        "weak_image_share": sum(w == "image" for w in weak) / len(weak) if weak else math.nan,
        "loss_text_last_epoch": mean([r["loss_text"] for r in last]),
        "loss_image_last_epoch": mean([r["loss_image"] for r in last]),
    }


def run_benchmark(root: str, settings: List[str], seeds: List[int], epochs: int, overrides: Optional[dict] = None,
                  log=print, param_grad_every: int = 10):
    """Every setting for every seed on the catalog under ``root``; returns (result rows, per-step rows)."""
    results, steps = [], []
    for seed in seeds:
        for name in settings:
            log(f"seed {seed}, {name} ...")
            row, rows = run_setting(root, SETTINGS[name], seed, epochs, overrides, param_grad_every)
            log(f"  test NDCG@10 fused {row['test_fused_ndcg@10']:.4f} text {row['test_text-only_ndcg@10']:.4f} "
                f"image {row['test_image-only_ndcg@10']:.4f} | grad T/V {row['grad_ratio_mean']:.3f} "
                f"weights T/V {row['param_grad_ratio_mean']:.3f} "
                f"weak image {row['weak_image_share']:.2f} | train {row['train_s']:.0f} s")
            results.append(row)
            steps.extend(rows)
    return results, steps


# ---------------------------------------------------------------------------------------------- output

def _stat(values: List[float], fmt: str) -> str:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return "n/a"
    if len(values) == 1:
        return format(values[0], fmt)
    return f"{format(statistics.mean(values), fmt)} ± {format(statistics.stdev(values), fmt)}"


TABLE_HEAD = ("setting", "fused NDCG@10", "text-only", "image-only", "gap text−image", "mean grad ratio",
              "weight-grad ratio", "weak image share", "train s")


def table_rows(results: List[dict], split: str = "test") -> List[List[str]]:
    rows = []
    for name in dict.fromkeys(r["setting"] for r in results):
        rs = [r for r in results if r["setting"] == name]
        rows.append([
            name,
            _stat([r[f"{split}_fused_ndcg@10"] for r in rs], ".4f"),
            _stat([r[f"{split}_text-only_ndcg@10"] for r in rs], ".4f"),
            _stat([r[f"{split}_image-only_ndcg@10"] for r in rs], ".4f"),
            _stat([r[f"{split}_text-only_ndcg@10"] - r[f"{split}_image-only_ndcg@10"] for r in rs], "+.4f"),
            _stat([r["grad_ratio_mean"] for r in rs], ".3f"),
            _stat([r["param_grad_ratio_mean"] for r in rs], ".3f"),
            _stat([r["weak_image_share"] for r in rs], ".2f"),
            _stat([r["train_s"] for r in rs], ".0f"),
        ])
    return rows


def format_text_table(rows: List[List[str]]) -> str:
    all_rows = [list(TABLE_HEAD)] + rows
    widths = [max(len(r[c]) for r in all_rows) for c in range(len(TABLE_HEAD))]
    return "\n".join(" | ".join(cell.ljust(w) if c == 0 else cell.rjust(w) for c, (cell, w) in
                                enumerate(zip(r, widths))) for r in all_rows)


def format_markdown_table(rows: List[List[str]]) -> str:
    lines = ["| " + " | ".join(TABLE_HEAD) + " |", "|" + "|".join(["---"] + ["---:"] * (len(TABLE_HEAD) - 1)) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def write_csv(path: str, rows: List[dict]) -> None:
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def write_markdown(path: str, results: List[dict], header: str, oracle: Optional[dict]) -> None:
    parts = [f"# Modality collapse on the synthetic catalog\n\n{header}\n"]
    for split in ("test", "valid"):
        parts.append(f"## {split} split (NDCG@10, full ranking; mean ± std over seeds where several)\n")
        parts.append(format_markdown_table(table_rows(results, split)) + "\n")
    hit = ["| setting | fused Hit@10 | text-only | image-only |", "|---|---:|---:|---:|"]
    for name in dict.fromkeys(r["setting"] for r in results):
        rs = [r for r in results if r["setting"] == name]
        hit.append(f"| {name} | " + " | ".join(_stat([r[f'test_{m}_hit@10'] for r in rs], ".4f") for m in MODES) + " |")
    parts.append("## test split, Hit@10\n\n" + "\n".join(hit) + "\n")
    if oracle:
        parts.append("## Oracle Hit@10 of the catalog (scorers that know the planted attributes)\n\n"
                     + " | ".join(f"{k}: {v:.3f}" for k, v in oracle.items())
                     + f"  (random: about {10 / 353:.3f})\n")
    parts.append("Gradient ratio: mean over training steps of ||dL/dE^T|| / ||dL/dE^V|| for that setting's loss "
                 "(> 1: text gets the larger gradient), at the encoder's normalised outputs: under external fusion it is exactly 1 "
                 "for any loss on fused scores alone (plain contrastive), so it mostly shows which modality WPCL pushes. "
                 "Weight-grad ratio: ||gradient reaching the trainable weights through the text branch|| / ||... image "
                 "branch||, sampled every --param-grad-every steps (the imbalance inside the shared encoder). Weak image share: fraction of steps on which the detector "
                 "(EMA of the per-modality InfoNCE) named the image the weak modality.\n")
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("\n".join(parts))


def plot(out: str, results: List[dict], steps: List[dict]) -> List[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = list(dict.fromkeys(r["setting"] for r in results))
    fig, ax = plt.subplots(figsize=(1.6 * len(names) + 2, 4))
    width = 0.27
    colours = {"text-only": "tab:blue", "image-only": "tab:orange", "fused": "tab:green"}
    for k, mode in enumerate(("text-only", "image-only", "fused")):
        means, errs = [], []
        for name in names:
            values = [r[f"test_{mode}_ndcg@10"] for r in results if r["setting"] == name]
            means.append(statistics.mean(values))
            errs.append(statistics.stdev(values) if len(values) > 1 else 0.0)
        ax.bar(np.arange(len(names)) + (k - 1) * width, means, width, yerr=errs if any(errs) else None,
               label=mode, color=colours[mode], capsize=3)
    ax.axhline(0.0127, color="grey", ls=":", lw=1, label="random (≈0.013)")
    ax.set_xticks(np.arange(len(names)), names)
    ax.set_ylabel("test NDCG@10 (full ranking)")
    seeds = sorted({r["seed"] for r in results})
    ax.set_title(f"Per-modality scoring, synthetic catalog, tiny-qwen2-vl (seeds {seeds})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    bars = os.path.join(out, "modality_metrics.png")
    fig.savefig(bars, dpi=120)
    plt.close(fig)

    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(8, 7.5), sharex=True)
    trained = [n for n in names if any(s["setting"] == n for s in steps)]
    cmap = plt.get_cmap("tab10")
    for c, name in enumerate(trained):
        for seed in seeds:
            mine = [s for s in steps if s["setting"] == name and s["seed"] == seed]
            ratio = np.array([s["grad_ratio"] for s in mine])
            if ratio.size == 0:
                continue
            x = np.arange(ratio.size)
            ax.plot(x, ratio, color=cmap(c), alpha=0.2, lw=0.7)
            window = min(15, ratio.size)
            smooth = np.convolve(ratio, np.ones(window) / window, mode="valid")
            ax.plot(x[window - 1:], smooth, color=cmap(c), lw=1.8, label=name if seed == seeds[0] else None)
            weights = np.array([s.get("param_grad_ratio", math.nan) for s in mine])
            keep = ~np.isnan(weights)
            if keep.any():
                ax2.plot(x[keep], weights[keep], "o-", color=cmap(c), ms=3, lw=1.2,
                         label=name if seed == seeds[0] else None)
    for axis in (ax, ax2):
        axis.axhline(1.0, color="grey", ls=":", lw=1)
        axis.set_yscale("log")
        axis.legend(fontsize=8)
    ax.set_ylabel("||dL/dE^T|| / ||dL/dE^V||")
    ax.set_title("Grad-norm ratio text/image at the embeddings (thin: per step; thick: 15-step mean)", fontsize=10)
    ax2.set_ylabel("weight-gradient ratio text/image")
    ax2.set_title("Gradient reaching the encoder weights through the text vs the image branch", fontsize=10)
    ax2.set_xlabel("training step")
    fig.tight_layout()
    ratio_png = os.path.join(out, "grad_ratio.png")
    fig.savefig(ratio_png, dpi=120)
    plt.close(fig)
    return [bars, ratio_png]


def write_outputs(out: str, results: List[dict], steps: List[dict], header: str, oracle: Optional[dict],
                  plots: bool = True) -> List[str]:
    os.makedirs(out, exist_ok=True)
    paths = [os.path.join(out, n) for n in ("results.csv", "results.md", "per_step.csv")]
    write_csv(paths[0], results)
    write_markdown(paths[1], results, header, oracle)
    write_csv(paths[2], steps)
    if plots:
        paths += plot(out, results, steps)
    return paths


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0", help="comma-separated seeds (RecBole seed and tiny_seed), default 0")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--settings", default=",".join(DEFAULT_SETTINGS),
                        help=f"comma-separated, from {', '.join(SETTINGS)}")
    parser.add_argument("--out", default="bench_out/modality_collapse")
    parser.add_argument("--param-grad-every", type=int, default=10,
                        help="measure the weight-gradient ratio text/image every N steps (0: never; 2 extra backwards)")
    parser.add_argument("--data-dir", default=None, help="build the catalog here (default: a temporary directory)")
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    unknown = [s for s in settings if s not in SETTINGS]
    if unknown or not seeds or args.epochs < 1:
        parser.error(f"unknown settings {unknown}; choose from {list(SETTINGS)}" if unknown else
                     "need at least one seed and --epochs >= 1")

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(1)
    from dataset_tools.synthetic import oracle_hit_rates

    total = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="modality-collapse-", dir=args.data_dir) as root:
        cwd = os.getcwd()
        out = os.path.abspath(args.out)
        dataset_dir = build_catalog(root)
        oracle = oracle_hit_rates(dataset_dir, DATASET, k=10)
        os.chdir(root)  # RecBole writes log/ and log_tensorboard/ under the working directory
        try:
            results, steps = run_benchmark(root, settings, seeds, args.epochs, param_grad_every=args.param_grad_every)
        finally:
            os.chdir(cwd)
    runtime = time.perf_counter() - total
    header = (f"Catalog: dataset_tools.demo.DEMO_SPEC (360 items, 1,000 users, text and image signal 1.0), 5-core. "
              f"Backbone tiny-qwen2-vl, full fine-tuning, lr 1e-3, 56 px, title text, 5-item histories, batch 64, "
              f"CPU, 1 thread; {args.epochs} epochs per trained setting, final model evaluated (no best-epoch "
              f"selection). Seeds {seeds}. Total runtime {runtime / 60:.1f} min.")
    paths = write_outputs(out, results, steps, header, oracle)
    print()
    print(header)
    print(f"oracle Hit@10: " + ", ".join(f"{k} {v:.3f}" for k, v in oracle.items()))
    print("\ntest split, NDCG@10 (full ranking)")
    print(format_text_table(table_rows(results, "test")))
    print("\nvalidation split, NDCG@10")
    print(format_text_table(table_rows(results, "valid")))
    print("\nwritten: " + ", ".join(paths))


if __name__ == "__main__":
    main()
