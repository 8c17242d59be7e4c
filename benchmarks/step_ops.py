"""Operators per training step, SASRec vs VLM2RecSASRec, counted with torch.profiler on CPU.

At hidden size 64 a GPU step is launch-bound: its time is roughly the number of operators it launches, plus
the host synchronisations that stall the launch queue. Both are counted here on CPU, where they are
deterministic: every ``aten::`` operator the profiler records in one training step (``zero_grad``,
``calculate_loss``, the sum of its terms, ``backward``, Adam's ``step``: RecBole's trainer step), and among
them ``aten::_local_scalar_dense``, the read of a tensor's value into Python (``.item()``, ``bool(t)``,
``int(t)``, ``float(t)``), which on a GPU is a host synchronisation.

Same batch for every row: the tiny-seq fixture (60 users, 40 items), ``train_batch_size`` 64, each model's
own YAML defaults (hidden size 64, 2 layers), random 64-d text and image features for VLM2RecSASRec (both
modalities). Rows:

* ``SASRec``: RecBole's own;
* ``VLM2RecSASRec``: the defaults;
* ``VLM2RecSASRec, diagnostics every step``: ``diagnostics_every: 1``, the extra autograd pass of the
  gradient-norm ratio on every step (the path before ``diagnostics_every`` existed);
* ``VLM2RecSASRec, compiled objective``: ``compile_objective: True`` (torch.compile; its fused kernels are not
  ``aten::`` operators, so its count is not comparable: the time is).

Each row also times ``--time-steps`` unprofiled training steps (model and Adam, after the profiled ones; one
thread): ``ms per step``, the wall time of the same work, compilation excluded.

Ends with the line ``ops per step: VLM2RecSASRec/SASRec = X.XX`` (the defaults) and writes
``benchmarks/results/step_ops.json``. Target: at most 2.00.

    python benchmarks/step_ops.py [--steps 10] [--out benchmarks/results/step_ops.json]
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile

REPO = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
FIXTURES = os.path.join(REPO, "tests", "fixtures")
HOST_READ = "aten::_local_scalar_dense"
ROWS = {
    "SASRec": ("SASRec", {}),
    "VLM2RecSASRec": ("VLM2RecSASRec", {}),
    "VLM2RecSASRec, diagnostics every step": ("VLM2RecSASRec", {"diagnostics_every": 1}),
    "VLM2RecSASRec, compiled objective": ("VLM2RecSASRec", {"compile_objective": True}),
}
TARGET = 2.0


def _features(root: str, tokens) -> str:
    import numpy as np

    from recbole_vlm2rec.item_embeddings import export_item_embeddings

    rng = np.random.default_rng(0)
    arrays = {m: rng.standard_normal((len(tokens), 64)).astype(np.float32) for m in ("text", "image")}
    prefix = os.path.join(root, "tiny-seq")
    export_item_embeddings(prefix, list(tokens), arrays, {"backbone": "random"})
    return prefix


def count_step_ops(model_name: str, overrides: dict, prefix: str, steps: int, time_steps: int) -> dict:
    """Mean ``aten::`` operators and host reads per training step over ``steps`` profiled steps (after two
    unprofiled ones: lazy initialisation and compilation are not a step's cost), and the mean wall time of
    ``time_steps`` unprofiled steps after them."""
    import time

    import torch
    from torch.profiler import ProfilerActivity, profile

    import recbole_vlm2rec  # noqa: F401  (registers the models)
    from recbole.config import Config
    from recbole.data import create_dataset, data_preparation
    from recbole.utils import get_model, init_seed

    settings = {"data_path": FIXTURES, "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
                "MAX_ITEM_LIST_LENGTH": 20, "train_batch_size": 64, "gpu_id": "", "show_progress": False}
    if model_name != "SASRec":
        settings["feature_prefix"] = prefix
    config = Config(model=model_name, dataset="tiny-seq", config_dict=dict(settings, **overrides))
    init_seed(config["seed"], config["reproducibility"])
    train_data, _, _ = data_preparation(config, create_dataset(config))
    model = get_model(model_name)(config, train_data._dataset)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    batch = next(iter(train_data))
    model.train()

    def model_step():  # what the model costs: its loss and the backward through it
        optimizer.zero_grad()
        loss = model.calculate_loss(batch)
        loss = sum(loss) if isinstance(loss, tuple) else loss
        loss.backward()

    for _ in range(2):
        model_step()
        optimizer.step()
    counts = collections.Counter()
    for part in ("model", "optimizer"):
        with profile(activities=[ProfilerActivity.CPU]) as profiler:
            for _ in range(steps):
                if part == "model":
                    model_step()
                else:
                    optimizer.step()
        for event in profiler.events():
            if event.name.startswith("aten::"):
                counts[part] += 1
                counts[part + "_host_reads"] += event.name == HOST_READ
        if part == "model":
            optimizer.step()
    start = time.perf_counter()
    for _ in range(time_steps):
        model_step()
        optimizer.step()
    ms_per_step = (time.perf_counter() - start) / max(time_steps, 1) * 1000
    return {"ms_per_step": ms_per_step, "ops_per_step": (counts["model"] + counts["optimizer"]) / steps,
            "model_ops_per_step": counts["model"] / steps, "optimizer_ops_per_step": counts["optimizer"] / steps,
            "model_host_reads_per_step": counts["model_host_reads"] / steps,
            "optimizer_host_reads_per_step": counts["optimizer_host_reads"] / steps, "settings": overrides}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="profiled steps per row (default 10: a multiple of diagnostics_every)")
    parser.add_argument("--time-steps", type=int, default=100, help="timed unprofiled steps per row (default 100)")
    parser.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "step_ops.json"))
    args = parser.parse_args(argv)
    sys.argv = sys.argv[:1]  # RecBole's Config reads --key=value pairs from the command line
    import torch

    torch.set_num_threads(1)
    rows = {}
    with tempfile.TemporaryDirectory(prefix="step-ops-") as root:
        prefix = _features(root, [f"i{i}" for i in range(1, 41)])  # the items of tiny-seq
        for name, (model_name, overrides) in ROWS.items():
            rows[name] = count_step_ops(model_name, overrides, prefix, args.steps, args.time_steps)
    base = rows["SASRec"]["ops_per_step"]
    print("| row | aten ops per step | of which loss + backward | of which Adam | host reads in loss + backward "
          "| ops vs SASRec | ms per step |\n|---|---|---|---|---|---|---|")
    for name, row in rows.items():
        row["ratio_to_sasrec"] = round(row["ops_per_step"] / base, 3)
        print(f"| {name} | {row['ops_per_step']:.0f} | {row['model_ops_per_step']:.0f} | "
              f"{row['optimizer_ops_per_step']:.0f} | {row['model_host_reads_per_step']:.0f} | "
              f"{row['ratio_to_sasrec']:.2f}x | {row['ms_per_step']:.2f} |")
    ratio = rows["VLM2RecSASRec"]["ratio_to_sasrec"]
    report = {"rows": rows, "steps": args.steps, "target_ratio": TARGET, "torch": torch.__version__,
              "batch": "tiny-seq fixture, train_batch_size 64, both modalities (64-d random features)"}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".tmp", "w") as f:
        json.dump(report, f, indent=1)
    os.replace(args.out + ".tmp", args.out)
    print(f"\nops per step: VLM2RecSASRec/SASRec = {ratio:.2f}  (target <= {TARGET:.2f}; written: {args.out})")


if __name__ == "__main__":
    main()
