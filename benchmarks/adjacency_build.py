"""Graph models' adjacency build: RecBole 1.2.1's dok_matrix algorithm vs our vectorised one, 1M interactions.

RecBole's LightGCN, NGCF, GCMC, NCL, SpectralCF, KGIN and MCCLK fill a ``scipy.sparse.dok_matrix`` from a
Python dict of every (row, col) pair with ``A._update(data_dict)``, which scipy 1.13 removed. To time the
original algorithm on today's scipy, ``_update`` is emulated as it was before scipy 1.13 (a plain
``dict.update`` of the entries, ``self._dict.update`` since scipy keeps them there) and RecBole's own method
(``compat.ORIGINAL_ADJACENCY_METHODS``) runs unchanged. Ours (``recbole_vlm2rec.compat`` section 8) builds
the same normalized matrix from the interaction matrix's coordinates with numpy (unique, argsort,
bincount) and ``torch.sparse_coo_tensor``. Both run on the same generated interaction matrix (random
user-item pairs, duplicates included, as RecBole's ``inter_matrix`` may hold them), one thread; the
matrices are checked to be identical (indices and values of the coalesced tensors, same dtype).

Methods timed (each distinct RecBole implementation once): ``get_norm_adj_mat`` (LightGCN; NGCF and GCMC
have the same code), NCL's (also keeps the degree vector), SpectralCF's ``get_laplacian_matrix``, and
KGIN's ``get_norm_inter_matrix`` (MCCLK's is the same code) in its "si" mode, as both models call it.

Usage: python benchmarks/adjacency_build.py [--interactions 1000000] [--users 60000] [--items 30000]
       [--repeats 3]
Prints a table (seconds: RecBole once, ours best of ``--repeats``) and writes
benchmarks/results/adjacency_build.json.
"""
import argparse
import json
import os
import platform
import sys
import time
import types

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "adjacency_build.json")
CASES = (  # (label, "Class.method", call arguments)
    ("LightGCN / NGCF / GCMC get_norm_adj_mat", "LightGCN.get_norm_adj_mat", ()),
    ("NCL get_norm_adj_mat", "NCL.get_norm_adj_mat", ()),
    ("SpectralCF get_laplacian_matrix", "SpectralCF.get_laplacian_matrix", ()),
    ("KGIN / MCCLK get_norm_inter_matrix(si)", "KGIN.get_norm_inter_matrix", ("si",)),
)


def interaction_matrix(n_interactions: int, n_users: int, n_items: int, seed: int = 0):
    """A float32 COO user-item matrix like ``dataset.inter_matrix(form="coo")``: ids from 1 (0 is padding)."""
    import numpy as np
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    rows = rng.integers(1, n_users, n_interactions)
    cols = rng.integers(1, n_items, n_interactions)
    data = np.ones(n_interactions, dtype=np.float32)
    return sp.coo_matrix((data, (rows, cols)), shape=(n_users, n_items))


def model_stub(matrix, n_users: int, n_items: int, n_entities: int):
    """What the methods read from the model: the interaction matrix, sizes, device, SpectralCF's eye."""
    import torch
    from recbole.model.general_recommender.spectralcf import SpectralCF

    stub = types.SimpleNamespace(interaction_matrix=matrix, inter_matrix=matrix, n_users=n_users,
                                 n_items=n_items, n_entities=n_entities, device=torch.device("cpu"))
    stub.get_eye_mat = types.MethodType(SpectralCF.get_eye_mat, stub)
    return stub


class dok_update_emulated:
    """``dok_matrix._update`` as before scipy 1.13 (a dict update of the entries, no validation)."""

    def __enter__(self):
        import scipy.sparse as sp

        self.had = hasattr(sp.dok_matrix, "_update")
        if not self.had:
            sp.dok_matrix._update = lambda matrix, data: matrix._dict.update(data)
        return self

    def __exit__(self, *exc):
        import scipy.sparse as sp

        if not self.had:
            del sp.dok_matrix._update


def identical(a, b) -> bool:
    """Same shape, dtype, coalesced indices and values (exactly) for tensors or tuples of tensors."""
    import torch

    if isinstance(a, tuple):
        return len(a) == len(b) and all(identical(x, y) for x, y in zip(a, b))
    a, b = a.coalesce(), b.coalesce()
    return (a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.indices(), b.indices())
            and torch.equal(a.values(), b.values()))


def timed(function, *args):
    start = time.perf_counter()
    result = function(*args)
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--interactions", type=int, default=1_000_000)
    parser.add_argument("--users", type=int, default=60_000)
    parser.add_argument("--items", type=int, default=30_000)
    parser.add_argument("--entities", type=int, default=45_000, help="KGIN/MCCLK: items plus other entities")
    parser.add_argument("--repeats", type=int, default=3, help="runs of ours (best is reported)")
    parser.add_argument("--out", default=RESULTS)
    args = parser.parse_args()

    import numpy as np
    import scipy
    import torch
    import warnings

    torch.set_num_threads(1)
    import recbole_vlm2rec  # noqa: F401  (applies the compatibility layer)
    from recbole_vlm2rec import compat

    warnings.filterwarnings("ignore")  # RecBole's torch.sparse.FloatTensor / LongTensor(list) deprecations
    matrix = interaction_matrix(args.interactions, args.users, args.items)
    unique_pairs = len(np.unique(matrix.row.astype(np.int64) * args.items + matrix.col))
    rows = []
    for label, key, call_args in CASES:
        class_name = key.split(".")[0]
        ours_method = compat._ADJACENCY_REPLACEMENTS[class_name]
        original_method = compat.ORIGINAL_ADJACENCY_METHODS[key]
        with dok_update_emulated():
            original_s, reference = timed(original_method, model_stub(matrix, args.users, args.items,
                                                                      args.entities), *call_args)
        ours_times = []
        for _ in range(args.repeats):
            seconds, ours = timed(ours_method, model_stub(matrix, args.users, args.items, args.entities),
                                  *call_args)
            ours_times.append(seconds)
        rows.append({"method": label, "recbole_s": original_s, "ours_s": min(ours_times), "ours_runs_s": ours_times,
                     "speedup": original_s / min(ours_times), "identical": identical(reference, ours)})
        del reference, ours

    print(f"Adjacency build on {args.interactions:,} interactions ({unique_pairs:,} distinct user-item pairs), "
          f"{args.users:,} users, {args.items:,} items, 1 thread")
    print(f"{'method':<42} {'RecBole (s)':>11} {'ours (s)':>9} {'speedup':>8} {'identical':>9}")
    for row in rows:
        print(f"{row['method']:<42} {row['recbole_s']:>11.2f} {row['ours_s']:>9.3f} {row['speedup']:>7.1f}x "
              f"{'yes' if row['identical'] else 'NO':>9}")
    report = {
        "benchmark": "adjacency_build",
        "interactions": args.interactions, "distinct_pairs": unique_pairs, "users": args.users,
        "items": args.items, "entities": args.entities, "threads": 1, "repeats": args.repeats,
        "python": platform.python_version(), "numpy": np.__version__, "scipy": scipy.__version__,
        "torch": torch.__version__, "cpu_count": os.cpu_count(), "machine": platform.machine(),
        "rows": rows,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as handle:
        json.dump(report, handle, indent=2)
        handle.write("\n")
    print(f"wrote {args.out}")
    if not all(row["identical"] for row in rows):
        sys.exit("the matrices differ")


if __name__ == "__main__":
    main()
