"""Hugging Face weight files written one shard at a time.

Which tensor goes in which ``model-0000k-of-0000n.safetensors`` is planned by ``huggingface_hub`` from the
tensors' shapes alone (meta tensors), before any value exists; the writer then asks for the tensors of a
file one at a time and streams each to disk (``write_safetensors``), so it holds one tensor, not a shard and
never the model. A model that fits one shard gets a single ``model.safetensors`` and no index, as
``save_pretrained`` does.

``write_safetensors`` is our own writer of the safetensors format: ``safetensors.torch.save_file`` needs every
tensor of the file at once and builds the whole file in memory first (2x the file).
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, NamedTuple

import torch
from huggingface_hub import StateDictSplit, split_torch_state_dict_into_shards

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedTokenizerBase

DEFAULT_MAX_SHARD_SIZE = "2GB"


class WeightsPlan(NamedTuple):
    specs: dict[str, tuple[tuple[int, ...], torch.dtype]]  # name -> (shape, dtype)
    split: StateDictSplit  # which names go in which file


def shard_plan(specs: dict[str, tuple[tuple[int, ...], torch.dtype]],
               max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE) -> WeightsPlan:
    """``specs``: name -> (shape, dtype), in the order the files should hold them."""
    meta = {name: torch.empty(shape, dtype=dtype, device="meta") for name, (shape, dtype) in specs.items()}
    return WeightsPlan(specs, split_torch_state_dict_into_shards(meta, max_shard_size=max_shard_size))


def write_weights(out_dir: Path | None, plan: WeightsPlan, tensor_of: Callable[[str], torch.Tensor | None]) -> None:
    """Call ``tensor_of(name)`` for every tensor of ``plan``, file by file, in the same order on every caller
    (it may be collective); where ``out_dir`` is given, write each file and, for several, the index."""
    for filename, names in plan.split.filename_to_tensors.items():
        if out_dir is None:
            for name in names:
                tensor_of(name)
        else:
            write_safetensors(out_dir / filename, {n: plan.specs[n] for n in names}, tensor_of, {"format": "pt"})
    if out_dir is not None and plan.split.is_sharded:
        index = {"metadata": plan.split.metadata, "weight_map": plan.split.tensor_to_filename}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def write_config_files(out_dir: Path, config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase) -> None:
    """What ``save_pretrained`` writes beside the weights: config.json, generation_config.json, tokenizer."""
    from transformers import GenerationConfig

    config.save_pretrained(str(out_dir))
    GenerationConfig.from_model_config(config).save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))


_DTYPE_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
                torch.bool: "BOOL"}


def dtype_named(name: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype name ("F32", "BF16", ...)."""
    return {v: k for k, v in _DTYPE_NAMES.items()}[name]


def dtype_name(dtype: torch.dtype) -> str:
    return _DTYPE_NAMES[dtype]


def write_safetensors(path: Path, specs: dict[str, tuple[tuple[int, ...], torch.dtype]],
                      tensor_of: Callable[[str], torch.Tensor | None], metadata: dict[str, str] | None = None) -> None:
    """A safetensors file of the tensors ``specs`` names (name -> (shape, dtype)), each asked for with
    ``tensor_of(name)`` in ``specs``' order and written before the next is asked for: the header is laid out
    from the shapes first, so memory holds one tensor (on any device; copied to the CPU one at a time)."""
    header: dict[str, Any] = {}
    offset = 0
    for name, (shape, dtype) in specs.items():
        size = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": _DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    if metadata:
        header["__metadata__"] = metadata
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(encoded)))
        handle.write(encoded)
        for name, (shape, dtype) in specs.items():
            held = tensor_of(name)
            if held is None:
                raise ValueError(f"{path}: no value for {name} on the rank that writes it")
            tensor = held.detach()
            if tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
                raise ValueError(f"{path}: {name} is {tuple(tensor.shape)} {tensor.dtype}, planned as {shape} {dtype}")
            if tensor.numel():
                data = tensor.to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
                handle.write(memoryview(data))  # type: ignore[arg-type]  # numpy's stubs give ndarray __buffer__ from Python 3.12 only
