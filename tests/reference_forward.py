"""The plain transformers path that the encoder is tested and benchmarked against.

``plain_inputs`` builds exactly what a ``Qwen2VLProcessor`` call would give for our prompts (ids,
mask, pixel values, grid, ``mm_token_type_ids``), and ``plain_forward`` runs the model's own
``forward`` on them, vision tower included, and pools like the encoder. The encoder must give the
same embeddings (tests) and should be much faster (``benchmarks/encoder_throughput.py``).
"""
from __future__ import annotations

import inspect
from typing import Sequence

import torch
import torch.nn.functional as F


def plain_inputs(encoder, prompts: Sequence[str], images: Sequence, device=None) -> dict:
    """Keyword arguments for the backbone's ``forward``: left-padded ids and, if any, the images' pixels.

    ``images`` are the PIL images of all image placeholders of all prompts, in order.
    """
    device = device or encoder.device
    batch = encoder.prompt_tokenizer.batch(encoder.prompt_tokenizer.encode(list(prompts)))
    inputs = {"input_ids": batch.input_ids.to(device), "attention_mask": batch.attention_mask.to(device)}
    if images:
        inputs["pixel_values"] = encoder.image_preprocessor(list(images)).to(device, encoder.dtype)
        inputs["image_grid_thw"] = encoder.image_preprocessor.grid_thw(len(images)).to(device)
    # transformers 5 takes the modality of each token to place the rotary positions; 4.x finds image tokens itself.
    if "mm_token_type_ids" in inspect.signature(encoder.base_model.forward).parameters:
        inputs["mm_token_type_ids"] = (inputs["input_ids"] == encoder.prompt_tokenizer.image_token_id).int()
    return inputs


def plain_forward(encoder, inputs: dict) -> torch.Tensor:
    """L2-normalised last-token hidden states ``[B, D]`` from the backbone's own forward."""
    out = encoder.base_model(**inputs, use_cache=False)
    return F.normalize(out.last_hidden_state[:, -1].float(), dim=-1)
