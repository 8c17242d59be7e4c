"""GradCache (Gao et al., 2021; the chunked step of VLM2Vec): an in-batch contrastive step whose batch, the
number of negatives, no longer has to fit in memory at once.

An in-batch contrastive loss needs every row's embedding before it has any gradient, so a plain step holds
the encoder's activations for the whole batch. GradCache splits the step in three:

1. encode the batch chunk by chunk without a graph (each chunk's activations freed at once), recording the
   random-number state before each chunk;
2. compute the loss on those embeddings, made leaves, and its gradient with respect to them (``B x D``:
   cheap);
3. encode each chunk again, with a graph, from its recorded random state (the same dropout masks), and
   back-propagate the cached gradient through it: ``dL/dtheta = sum_chunks (dL/dE_chunk) . dE_chunk/dtheta``,
   handed to autograd as the gradient of the parameters (once per step, as DDP expects).

The loss and the gradients are those of the unchunked step; the price is one more forward per chunk. Peak
activation memory is that of ``chunk_size`` rows instead of the batch's.

Step 3 runs when autograd reaches the loss (``loss.backward()`` in RecBole's trainer), not when the loss is
computed: whatever weights the loss there (the gradient scaler's factor, ``lambda``) weights the cached
gradient too, and the returned losses behave like plain ones.

Example (a two-tower step; ``encode_users(rows)`` / ``encode_items(rows)`` encode the rows of a slice)::

    cache = GradCache(chunk_size=8, parameters=model.parameters())
    users = cache.encode(encode_users, rows=len(batch))   # leaves, no graph to the encoder yet
    items = cache.encode(encode_items, rows=len(batch))
    (loss,) = cache.losses(info_nce(users, items))
    loss.backward()                                        # re-encodes chunk by chunk, then fills the .grad
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable, ContextManager, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

# What an encoder returns: a tensor, or a dataclass of tensors (per-modality embeddings and their masks)
Embeddings = object
_AUTOCAST_DEVICES = ("cpu", "cuda")


def _fields(embeddings) -> List[Tensor]:
    if isinstance(embeddings, Tensor):
        return [embeddings]
    return [getattr(embeddings, f.name) for f in dataclasses.fields(embeddings)]


def _rebuild(template, tensors: Sequence[Tensor]):
    if isinstance(template, Tensor):
        return tensors[0]
    return dataclasses.replace(template, **{f.name: t for f, t in zip(dataclasses.fields(template), tensors)})


class _RandomState:
    """The CPU and CUDA random states at construction, restored inside ``with`` (and the states outside it
    left as they were): the recomputation draws the dropout masks of the first pass."""

    def __init__(self):
        self.devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
        self.cpu = torch.get_rng_state()
        self.cuda = [torch.cuda.get_rng_state(d) for d in self.devices]

    @contextlib.contextmanager
    def restored(self):
        with torch.random.fork_rng(devices=self.devices):
            torch.set_rng_state(self.cpu)
            for device, state in zip(self.devices, self.cuda):
                torch.cuda.set_rng_state(state, device)
            yield


class _AutocastState:
    """Autocast as it is where the loss is computed (RecBole's ``enable_amp``), re-entered for step 3, which
    runs in the backward pass where no autocast is active."""

    def __init__(self):
        self.states = [(d, torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in _AUTOCAST_DEVICES]

    @contextlib.contextmanager
    def restored(self):
        with contextlib.ExitStack() as stack:
            for device, enabled, dtype in self.states:
                stack.enter_context(torch.autocast(device_type=device, dtype=dtype, enabled=enabled))
            yield


@dataclasses.dataclass
class _Encoded:
    encode: Callable[[slice], Embeddings]
    chunks: List[Tuple[slice, _RandomState]]
    leaves: List[Optional[Tensor]]  # one per floating field of the embeddings; None for masks and ids


class GradCache:
    """One chunked contrastive step (module docstring). Make a new one per step.

    Args:
        chunk_size: rows encoded at once, ``>= 1``.
        parameters: the trainable parameters the encoders use. Step 3 computes their gradient itself
            (``torch.autograd.grad``, summed over the chunks) and returns it to autograd as this node's
            gradient for them, so each parameter receives one gradient per step, as in a plain step: what
            DDP's reducer expects (its hooks fire once per parameter and step) under ``--nproc``.
        recomputing: optional context manager factory entered around step 3's forwards, e.g. to keep an
            encoder's counters of unusable inputs from counting the batch twice.
    """

    def __init__(self, chunk_size: int, parameters: Iterable[Tensor],
                 recomputing: Optional[Callable[[], ContextManager]] = None):
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"contrastive_chunk_size must be an integer >= 1, got {chunk_size!r}")
        self.chunk_size = chunk_size
        self.parameters = [p for p in parameters if p.requires_grad]
        self.recomputing = recomputing or contextlib.nullcontext
        self._encoded: List[_Encoded] = []
        self._autocast: Optional[_AutocastState] = None

    def encode(self, encode: Callable[[slice], Embeddings], rows: int) -> Embeddings:
        """``encode(rows_slice)`` applied chunk by chunk without a graph, concatenated; floating tensors come
        back as leaves that require grad (the loss is computed on them)."""
        if self._autocast is None:
            self._autocast = _AutocastState()
        chunks, outputs = [], []
        for start in range(0, rows, self.chunk_size):
            rows_slice = slice(start, min(start + self.chunk_size, rows))
            state = _RandomState()
            with torch.no_grad():
                outputs.append(encode(rows_slice))
            chunks.append((rows_slice, state))
        joined = [torch.cat(parts) for parts in zip(*map(_fields, outputs))]
        leaves = [t.detach().requires_grad_() if t.is_floating_point() else None for t in joined]
        self._encoded.append(_Encoded(encode, chunks, leaves))
        return _rebuild(outputs[0], [leaf if leaf is not None else t for leaf, t in zip(leaves, joined)])

    def losses(self, *losses: Tensor) -> Tuple[Tensor, ...]:
        """The losses computed on the leaves, returned as tensors whose backward runs step 3."""
        if not any(loss.requires_grad for loss in losses):
            raise ValueError("GradCache.losses: no loss depends on the encoded leaves")
        # The losses' graphs (from the leaves) are not inputs of the returned tensors' node: autograd would
        # walk them after step 2 has freed them. The node's inputs are the parameters (their gradient is
        # step 3's result) and a throwaway leaf (the returned tensors require grad even without parameters).
        anchor = torch.zeros((), requires_grad=True)
        values = [loss.detach() for loss in losses]
        return _CachedLosses.apply(self, losses, len(self.parameters), anchor, *self.parameters, *values)

    def _backward(self, grad_outputs: Sequence[Tensor], losses: Sequence[Tensor]) -> List[Optional[Tensor]]:
        """Steps 2 and 3: the parameters' gradient (None for one no chunk reached)."""
        leaves = [leaf for encoded in self._encoded for leaf in encoded.leaves if leaf is not None]
        pairs = [(loss, grad) for loss, grad in zip(losses, grad_outputs) if loss.requires_grad and grad is not None]
        grads = torch.autograd.grad([p[0] for p in pairs], leaves, [p[1] for p in pairs], allow_unused=True)
        cached = iter(grads)
        totals: List[Optional[Tensor]] = [None] * len(self.parameters)
        if not self.parameters:  # nothing trains (a frozen encoder): no chunk to encode again
            return totals
        with torch.enable_grad(), self._autocast.restored(), self.recomputing():
            for encoded in self._encoded:
                leaf_grads = [next(cached) if leaf is not None else None for leaf in encoded.leaves]
                for rows_slice, state in encoded.chunks:
                    with state.restored():
                        tensors = _fields(encoded.encode(rows_slice))
                    outputs, seeds = [], []
                    for tensor, grad in zip(tensors, leaf_grads):
                        if grad is not None and tensor.requires_grad:
                            outputs.append(tensor)
                            seeds.append(grad[rows_slice].to(tensor.dtype))
                    if not outputs:
                        continue
                    chunk = torch.autograd.grad(outputs, self.parameters, seeds, allow_unused=True)
                    totals = [t if g is None else (g if t is None else t + g) for t, g in zip(totals, chunk)]
        return totals


class _CachedLosses(torch.autograd.Function):
    """Identity on the losses' values; its backward runs ``GradCache._backward`` with the incoming gradients
    and returns the parameters' gradient."""

    @staticmethod
    def forward(ctx, cache: GradCache, losses: Tuple[Tensor, ...], n_parameters: int, anchor: Tensor, *rest: Tensor):
        ctx.cache, ctx.losses = cache, losses  # the losses' graphs from the leaves, for step 2
        return tuple(value.clone() for value in rest[n_parameters:])

    @staticmethod
    def backward(ctx, *grad_outputs: Tensor):
        parameter_grads = ctx.cache._backward(grad_outputs, ctx.losses)
        return (None, None, None, None, *parameter_grads) + (None,) * len(grad_outputs)
