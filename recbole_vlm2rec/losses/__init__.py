"""VLM2Rec's contrastive objective: InfoNCE, WPCL, CRTR and the weak-modality detector.

docs/design.md#losses gives the equations and the reasons for each choice; every equation is repeated in the docstring of the piece that
computes it. Conventions shared by all pieces:

* In-batch targets: row ``b`` of a score matrix ``S[B, B]`` is user ``b``; column ``j`` is the positive item
  of user ``j``, so the positive of row ``b`` is ``S[b, b]`` and every other column is a negative.
* Masks are bool tensors of shape ``[B]``, ``True`` = present. ``row_mask`` chooses the users (rows) that are
  scored, ``col_mask`` the items (columns) that exist as candidates. A row whose own positive column is
  masked has nothing to score and is dropped as well.
* A loss over masked rows is the mean over the rows that remain. If none remains, the value is a zero that
  is still connected to the graph (so ``backward`` works and gives zero gradients, never NaN), and
  ``LossTerm.rows`` is 0, which is how a caller learns that the term was skipped.
* Losses are computed in float32, whatever the input dtype: under bf16 autocast, ``cos / 0.05`` followed by
  ``exp`` loses too much precision otherwise, and the ``[B, B]`` matrices are small.

Where things are (one module per term, as sentence-transformers' losses): ``info_nce.py`` (InfoNCE),
``wpcl.py`` (WPCL), ``crtr.py`` (CRTR), ``detector.py`` (the weak-modality detector), ``objective.py``
(``VLM2RecObjective``, the whole objective), ``inputs.py`` (tensor argument checks). Value checks of
arguments come from ``recbole_vlm2rec.checks``, the fusion formula from ``recbole_vlm2rec.fusion``. The
package imports nothing else of ours: the RecBole models build on it, not the other way round.
"""
from __future__ import annotations

from recbole_vlm2rec.fusion import MODALITIES

from .crtr import CRTRLoss
from .detector import CRITERIA, RetrievalTerm, WeakModalityDetector, in_batch_retrieval, modality_gradient_norms
from .info_nce import InfoNCELoss, LossTerm, cosine_scores, info_nce
from .objective import RELATIONS, ObjectiveOutput, VLM2RecObjective
from .wpcl import WPCL_FORMS, WPCLLoss

__all__ = [
    "MODALITIES",
    "CRITERIA",
    "RELATIONS",
    "WPCL_FORMS",
    "LossTerm",
    "cosine_scores",
    "info_nce",
    "InfoNCELoss",
    "WPCLLoss",
    "CRTRLoss",
    "modality_gradient_norms",
    "RetrievalTerm",
    "in_batch_retrieval",
    "WeakModalityDetector",
    "ObjectiveOutput",
    "VLM2RecObjective",
]
