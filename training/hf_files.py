"""Hugging Face weight files written one shard at a time.

Which tensor goes in which ``model-0000k-of-0000n.safetensors`` is planned by ``huggingface_hub`` from the
tensors' shapes alone (meta tensors), before any value exists; the writer then asks for the tensors of one
file, writes it and lets them go, so it holds one shard (``max_shard_size``), never the model. A model that
fits one shard gets a single ``model.safetensors`` and no index, as ``save_pretrained`` does.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors.torch import save_file

DEFAULT_MAX_SHARD_SIZE = "2GB"


def shard_plan(specs: dict[str, tuple[tuple[int, ...], torch.dtype]], max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE):
    """``specs``: name -> (shape, dtype), in the order the files should hold them."""
    meta = {name: torch.empty(shape, dtype=dtype, device="meta") for name, (shape, dtype) in specs.items()}
    return split_torch_state_dict_into_shards(meta, max_shard_size=max_shard_size)


def write_weights(out_dir: Path | None, plan, tensor_of: Callable[[str], torch.Tensor | None]) -> None:
    """Call ``tensor_of(name)`` for every tensor of ``plan``, file by file, in the same order on every caller
    (it may be collective); where ``out_dir`` is given, write each file and, for several, the index."""
    for filename, names in plan.filename_to_tensors.items():
        tensors = {}
        for name in names:
            tensor = tensor_of(name)
            if out_dir is not None:
                tensors[name] = tensor.detach().cpu().contiguous()
        if out_dir is not None:
            save_file(tensors, str(out_dir / filename), metadata={"format": "pt"})
        del tensors
    if out_dir is not None and plan.is_sharded:
        index = {"metadata": plan.metadata, "weight_map": plan.tensor_to_filename}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def write_config_files(out_dir: Path, config, tokenizer) -> None:
    """What ``save_pretrained`` writes beside the weights: config.json, generation_config.json, tokenizer."""
    from transformers import GenerationConfig

    config.save_pretrained(str(out_dir))
    GenerationConfig.from_model_config(config).save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
