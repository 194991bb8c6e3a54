"""LoRA targets (`train.peft`): the loaded model wrapped with peft's LoRA before a strategy wraps it.

Only the adapters' A and B matrices train; the base weights stay frozen (and, with
`quantize: 4bit`, are held in 4-bit NF4 by bitsandbytes: QLoRA, CUDA only). A checkpoint, and
so the target, holds the adapter as peft writes it (`adapter_config.json` +
`adapter_model.safetensors`); its config names the base it was trained on
(`base_model_name_or_path`, `revision`) by the reference the run loaded (a local path made
absolute, a hub id, a `demo:` asset), which is what the merge stage resolves to find that base.

Target module names are checked against the model before peft sees them, so a misspelt name
fails naming it and the names the model has, instead of peft's generic message.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from fusion_ray import locations
from fusion_ray.checkpoint.adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, is_adapter_dir  # noqa: F401 (is_adapter_dir: for the loop)


def is_peft(module) -> bool:
    return hasattr(module, "peft_config") and hasattr(module, "get_base_model")


def adaptable(module) -> bool:
    """Layers peft's LoRA can wrap (linear, GPT-2's Conv1D, embeddings)."""
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, torch.nn.Linear | torch.nn.Embedding | Conv1D)


def check_targets(model, targets: list[str] | str) -> None:
    """Every configured name matches at least one adaptable module (`name` is the module's last
    part or a dotted suffix of its name, as peft matches).

    Raises:
        ValueError: naming the unknown names and the adaptable names the model has.
    """
    if isinstance(targets, str):  # "all-linear": peft picks them
        return
    modules = {name: m for name, m in model.named_modules() if name}
    have = sorted({name.rsplit(".", 1)[-1] for name, m in modules.items() if adaptable(m)})
    unknown, not_layers = [], []
    for target in targets:
        hits = [m for name, m in modules.items() if name == target or name.endswith("." + target)]
        if not hits:
            unknown.append(target)
        elif not all(adaptable(m) for m in hits):
            not_layers.append(target)
    if unknown:
        raise ValueError(f"train.peft.target_modules: {', '.join(unknown)} not found in the model "
                         f"({type(model).__name__}); its linear layers are named: {', '.join(have)}")
    if not_layers:
        raise ValueError(f"train.peft.target_modules: {', '.join(not_layers)} name(s) modules that are not "
                         f"linear or embedding layers; name the layers themselves: {', '.join(have)}")


def quantized_load_kwargs(settings, use_gpu: bool) -> dict:
    """`from_pretrained` arguments for the 4-bit base of QLoRA (empty without `quantize`).

    Raises:
        ValueError: bitsandbytes is missing or no CUDA GPU is there, naming which.
    """
    if not settings.quantize:
        return {}
    missing = []
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        missing.append("the bitsandbytes package (pip install bitsandbytes)")
    if not (use_gpu and torch.cuda.is_available()):
        missing.append("a CUDA GPU (train.use_gpu: true on a node that has one)")
    if missing:
        raise ValueError(f"train.peft.quantize: 4bit (QLoRA) needs {' and '.join(missing)}; "
                         "remove `quantize` to train LoRA on the unquantized base")
    from transformers import BitsAndBytesConfig

    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    return {"quantization_config": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                      bnb_4bit_compute_dtype=torch.bfloat16,
                                                      bnb_4bit_use_double_quant=True),
            "device_map": {"": local_rank}}


def base_reference(ref: str) -> str:
    """The base as the adapter names it: a local path absolute, other references as given."""
    return str(Path(ref).expanduser().resolve()) if locations.kind(ref) == "local" else ref


def apply_lora(model, settings, *, base_ref: str, revision: str | None = None,
               gradient_checkpointing: bool = False):
    """`model` wrapped with fresh LoRA adapters (a peft `PeftModel`); only they require grad."""
    import peft

    check_targets(model, settings.target_modules)
    if settings.quantize:
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing,
                                                     gradient_checkpointing_kwargs={"use_reentrant": False})
    config = peft.LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                             target_modules=settings.target_modules, bias="none", task_type="CAUSAL_LM")
    wrapped = peft.get_peft_model(model, config)
    adapter = wrapped.peft_config["default"]
    adapter.base_model_name_or_path, adapter.revision = base_reference(base_ref), revision
    return wrapped


def trainable_fraction(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def save_adapter(module, path: str, state_dict: dict | None = None) -> None:
    """peft's adapter files into `path` (no full embedding copies: the vocabulary never changes here)."""
    module.save_pretrained(path, state_dict=state_dict, save_embedding_layers=False)


def load_adapter_weights(module, path: str) -> None:
    """A checkpoint's adapter weights into the wrapped model (resume).

    Raises:
        ValueError: the file misses an adapter weight of the model or holds one the model lacks.
    """
    import peft
    from safetensors.torch import load_file

    file = os.path.join(path, ADAPTER_WEIGHTS)
    if not os.path.isfile(file):
        raise ValueError(f"checkpoint {path} holds no {ADAPTER_WEIGHTS}: it was not written by a LoRA run")
    result = peft.set_peft_model_state_dict(module, load_file(file))
    missing = [k for k in result.missing_keys if "lora_" in k]
    if result.unexpected_keys or missing:
        raise ValueError(f"{file} does not fit the model's adapters: missing {missing[:5]}, "
                         f"unexpected {list(result.unexpected_keys)[:5]}")
