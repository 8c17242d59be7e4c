"""Which weights train: LoRA adapters through peft (the default), full fine-tuning, or nothing.

LoRA goes on the language model's linear layers named in ``lora_target_modules`` only. The vision tower
stays frozen unless ``train_vision_tower`` is set (then its linear layers get adapters too, or train fully
with ``finetune: full``), which is what keeps the vision cache valid. Target modules are passed to peft
as full module names: Qwen2.5-VL's vision MLP also has ``gate_proj``/``up_proj``/``down_proj`` layers,
which plain suffix matching would catch.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import warnings

import torch

logger = logging.getLogger(__name__)


def _module_prefix(root: torch.nn.Module, target: torch.nn.Module) -> str:
    for name, module in root.named_modules():
        if module is target:
            return name
    raise ValueError("module not found inside the backbone")


def lora_target_names(model: torch.nn.Module, base: torch.nn.Module, cfg) -> list:
    """Full names of the linear layers that get adapters (language model, plus vision tower if trained)."""
    lm_prefix = _module_prefix(model, base.language_model) + "."
    vis_prefix = _module_prefix(model, base.visual) + "."
    wanted = set(cfg.lora_target_modules)
    names, found, available = [], set(), set()
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        leaf = name.rsplit(".", 1)[-1]
        if name.startswith(lm_prefix):
            available.add(leaf)
            if leaf in wanted:
                names.append(name)
                found.add(leaf)
        elif cfg.train_vision_tower and name.startswith(vis_prefix):
            names.append(name)
    if wanted - found:
        raise ValueError(
            f"lora_target_modules {sorted(wanted - found)} match no linear layer of the language model; "
            f"its linear layers are named {sorted(available)}"
        )
    return names


def setup_trainable(model: torch.nn.Module, base: torch.nn.Module, cfg) -> torch.nn.Module:
    """Freeze what does not train, add LoRA adapters (returns the peft model) or unfreeze for full training."""
    model.requires_grad_(False)
    if cfg.finetune != "frozen" and cfg.gradient_checkpointing:
        # Non-reentrant checkpointing needs no input that requires grad, so inputs_embeds built outside the
        # model (the vision-cache splice) work unchanged.
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # the name since transformers 5.2x
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if cfg.finetune == "lora":
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, bias="none",
                          target_modules=lora_target_names(model, base, cfg))
        with _quiet_peft():
            return get_peft_model(model, lora)
    if cfg.finetune == "full":
        base.language_model.requires_grad_(True)
        if cfg.train_vision_tower:
            base.visual.requires_grad_(True)
    return model


def is_peft(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def save_adapter(model, directory: str, extra: dict) -> None:
    """Write the LoRA adapter alone (``adapter_config.json`` + ``adapter_model.safetensors``) and our sidecar."""
    if not is_peft(model):
        raise ValueError("save_adapter: this encoder has no LoRA adapter (finetune is not 'lora', or it was merged)")
    os.makedirs(directory, exist_ok=True)
    model.save_pretrained(directory)
    with open(os.path.join(directory, "vlm2rec_adapter.json"), "w") as f:
        json.dump(extra, f, indent=1)


def load_adapter(model, directory: str, trainable: bool):
    """Load an adapter saved by :func:`save_adapter`; returns the (possibly newly wrapped) model.

    An encoder that already has an adapter of the same shape gets the weights copied in place, so an
    optimizer built over its parameters stays valid; otherwise the model is wrapped anew.
    """
    from peft import LoraConfig, PeftModel
    from peft.utils import load_peft_weights, set_peft_model_state_dict

    if not os.path.exists(os.path.join(directory, "adapter_config.json")):
        raise FileNotFoundError(f"load_adapter: {directory} has no adapter_config.json (write one with save_adapter)")
    saved = LoraConfig.from_pretrained(directory)
    if is_peft(model):
        current = model.peft_config["default"]
        same = (saved.r == current.r and saved.lora_alpha == current.lora_alpha
                and set(saved.target_modules or ()) == set(current.target_modules or ()))
        if same:
            device = next(model.parameters()).device
            weights = load_peft_weights(directory, device=str(device))
            result = set_peft_model_state_dict(model, weights)
            unexpected = list(getattr(result, "unexpected_keys", []) or [])
            if unexpected:
                raise ValueError(f"load_adapter: {directory} holds weights this model lacks, e.g. {unexpected[:3]}")
            return model
        logger.info("load_adapter: %s has another LoRA shape (r=%s); replacing the current adapter.", directory, saved.r)
        model = model.unload()
    with _quiet_peft():
        return PeftModel.from_pretrained(model, directory, is_trainable=trainable)


@contextlib.contextmanager
def _quiet_peft():
    """peft reads ``is_gradient_checkpointing``, which transformers 5.2x deprecates: not the user's concern."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield
