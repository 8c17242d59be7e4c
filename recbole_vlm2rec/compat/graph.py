"""Graph adjacency matrices without ``dok_matrix._update`` (section 8 of ``recbole_vlm2rec.compat``).

Vectorised replacements of the RecBole 1.2.1 methods that fill a dok_matrix with the private
``_update`` that scipy 1.13 removed; each returns RecBole's matrix value for value.
"""
from __future__ import annotations

import importlib

import numpy as np
import torch


# --- 8. graph adjacency matrices without dok_matrix._update ----------------------------------------
# (module, class, method) of every RecBole 1.2.1 model that fills a dok_matrix with ``_update``
_ADJACENCY_METHODS = (
    ("recbole.model.general_recommender.lightgcn", "LightGCN", "get_norm_adj_mat"),
    ("recbole.model.general_recommender.ngcf", "NGCF", "get_norm_adj_mat"),
    ("recbole.model.general_recommender.ncl", "NCL", "get_norm_adj_mat"),
    ("recbole.model.general_recommender.gcmc", "GCMC", "get_norm_adj_mat"),
    ("recbole.model.general_recommender.spectralcf", "SpectralCF", "get_laplacian_matrix"),
    ("recbole.model.knowledge_aware_recommender.kgin", "KGIN", "get_norm_inter_matrix"),
    ("recbole.model.knowledge_aware_recommender.mcclk", "MCCLK", "get_norm_inter_matrix"),
)
# "Class.method" -> RecBole's own function (the reference for tests and benchmarks/adjacency_build.py)
ORIGINAL_ADJACENCY_METHODS: dict = {}


def symmetric_bipartite_edges(inter_matrix, n_users: int, n_nodes: int):
    """The non-zero pattern of RecBole's square adjacency, as (rows, cols, degrees), rows sorted then cols.

    RecBole puts a 1 at ``(u, n_users + i)`` and ``(n_users + i, u)`` for every stored entry ``(u, i)`` of
    the user-item matrix (a dict: duplicates count once) in an ``n_nodes`` square matrix; ``degrees`` is
    each node's number of neighbours, RecBole's ``(A > 0).sum(axis=1)``.
    """
    coo = inter_matrix.tocoo()
    n_cols = np.int64(inter_matrix.shape[1])
    keys = np.sort(coo.row.astype(np.int64) * n_cols + coo.col.astype(np.int64))
    if keys.size:  # deduplicated (np.unique hashes first on numpy 2.3+, several times slower than this)
        keys = keys[np.concatenate(([True], keys[1:] != keys[:-1]))]
    users, items = keys // n_cols, keys % n_cols
    by_item = np.argsort(items, kind="stable")  # users stay sorted within an item
    rows = np.concatenate([users, items[by_item] + n_users])
    cols = np.concatenate([items + n_users, users[by_item]])
    degrees = np.bincount(rows, minlength=n_nodes)
    return rows, cols, degrees


def _sparse_tensor(rows, cols, values, shape):
    # the indices are valid by construction: torch's invariant checks (and their warning) are not needed
    return torch.sparse_coo_tensor(torch.from_numpy(np.stack([rows, cols])), torch.from_numpy(values),
                                   torch.Size(shape), check_invariants=False)


def _sym_norm_adjacency(self, keep_diag: bool):
    """D^-1/2 A D^-1/2 as RecBole's LightGCN/NGCF/GCMC/NCL compute it (degree + 1e-7 in float64)."""
    n_nodes = self.n_users + self.n_items
    rows, cols, degrees = symmetric_bipartite_edges(self.interaction_matrix, self.n_users, n_nodes)
    diag = np.power(degrees + 1e-7, -0.5)
    if keep_diag:  # NCL keeps it
        self.diag = torch.from_numpy(diag).to(self.device)
    values = (diag[rows] * diag[cols]).astype(np.float32)
    return _sparse_tensor(rows, cols, values, (n_nodes, n_nodes))


def _get_norm_adj_mat(self):
    """RecBole's ``get_norm_adj_mat`` (LightGCN, NGCF, GCMC), vectorised: the same matrix, no dok_matrix."""
    return _sym_norm_adjacency(self, keep_diag=False)


def _ncl_get_norm_adj_mat(self):
    """NCL's ``get_norm_adj_mat`` (also sets ``self.diag``), vectorised: the same matrix, no dok_matrix."""
    return _sym_norm_adjacency(self, keep_diag=True)


def _spectralcf_get_laplacian_matrix(self):
    """SpectralCF's ``get_laplacian_matrix`` (I - D^-1 A), vectorised: the same matrix, no dok_matrix."""
    n_nodes = self.n_users + self.n_items
    rows, cols, degrees = symmetric_bipartite_edges(self.interaction_matrix, self.n_users, n_nodes)
    diag = np.power(degrees + 1e-7, -1)
    a_tilde = _sparse_tensor(rows, cols, diag[rows].astype(np.float32), (n_nodes, n_nodes))
    return self.get_eye_mat(n_nodes) - a_tilde


def _kg_get_norm_inter_matrix(self, mode="bi"):
    """KGIN's and MCCLK's ``get_norm_inter_matrix``, vectorised: the same two matrices, no dok_matrix.

    RecBole normalizes in float32 here (``A.sum(1)`` of a float32 matrix); so does this."""
    n_nodes = self.n_users + self.n_entities
    rows, cols, degrees = symmetric_bipartite_edges(self.inter_matrix, self.n_users, n_nodes)
    rowsum = degrees.astype(np.float32)
    with np.errstate(divide="ignore"):  # entities without interactions: inf, then 0, as in RecBole
        if mode == "bi":
            d = np.power(rowsum, np.float32(-0.5))
        elif mode == "si":
            d = np.power(rowsum, np.float32(-1))
        else:
            raise NotImplementedError(f"Normalize mode [{mode}] has not been implemented.")
    d[np.isinf(d)] = 0.0
    values = d[rows] * d[cols] if mode == "bi" else d[rows]
    norm_graph = _sparse_tensor(rows, cols, values, (n_nodes, n_nodes))
    upper = rows < self.n_users  # the user->item block, [n_users, n_entities]
    norm_matrix = _sparse_tensor(rows[upper], cols[upper] - self.n_users, values[upper],
                                 (self.n_users, n_nodes - self.n_users))
    return norm_matrix.to(self.device), norm_graph.to(self.device)


_ADJACENCY_REPLACEMENTS = {
    "LightGCN": _get_norm_adj_mat,
    "NGCF": _get_norm_adj_mat,
    "GCMC": _get_norm_adj_mat,
    "NCL": _ncl_get_norm_adj_mat,
    "SpectralCF": _spectralcf_get_laplacian_matrix,
    "KGIN": _kg_get_norm_inter_matrix,
    "MCCLK": _kg_get_norm_inter_matrix,
}


def _vectorised_graph_adjacency() -> None:
    for module_name, class_name, method in _ADJACENCY_METHODS:
        cls = getattr(importlib.import_module(module_name), class_name)
        key = f"{class_name}.{method}"
        ORIGINAL_ADJACENCY_METHODS.setdefault(key, getattr(cls, method))
        setattr(cls, method, _ADJACENCY_REPLACEMENTS[class_name])
