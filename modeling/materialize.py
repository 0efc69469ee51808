"""Give values to the parameters a rank keeps, without ever holding the whole model.

The model is first built with its parameters on the meta device (``empty_model``; buffers, which are small,
are real), the tensor-parallel plan and the stage split are applied there, and then ``materialize`` gives
values to the parameters this rank keeps, holding at most one full tensor at a time:

- ``StoredWeights``: from safetensors files (a ``save_pretrained`` directory, single file or hub-style shards
  with ``model.safetensors.index.json``, or a colonnade checkpoint's ``model.safetensors``). Each kept slice
  is read with ``get_slice``, so a rank reads only the bytes it keeps. Pickled ``.bin`` weights are read
  whole (tensors only) and then cut. Stored names and forms that differ from the model's (per-expert MoE
  tensors, old names) are converted by transformers' own rules (``modeling.checkpoint_conversion``).
- ``SeededInit``: from scratch. Each module is initialised by the model's own ``_init_weights`` under a
  generator seeded by (seed, module name), on CPU stand-ins of full size, and only the slices are kept.
  Every layout (tensor, pipeline, data) therefore starts from the same full weights.

Which slice a rank keeps is ``modeling.shards.Shard`` (the rule in ``parallel.layers.shard_ranges``).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import pickle
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed import ProcessGroup
from torch.overrides import TorchFunctionMode
from transformers import PretrainedConfig, PreTrainedModel

from modeling.checkpoint_conversion import convert_whole, placement_of, plan, read_placed
from modeling.shards import Shard, shards


class WeightsError(ValueError):
    pass


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Every parameter registered inside is moved to the meta device (what ``accelerate.init_empty_weights``
    does); buffers stay real."""
    register = nn.Module.register_parameter

    def register_on_meta(module, name, param):
        register(module, name, param)
        if param is not None and not param.is_meta:
            kwargs = dict(param.__dict__)
            module._parameters[name] = type(param)(param.to("meta"), requires_grad=param.requires_grad)
            module._parameters[name].__dict__.update(kwargs)

    nn.Module.register_parameter = register_on_meta  # type: ignore[method-assign]  # patched while constructing
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]  # and restored


def empty_model(auto_class: Any, hf_config: PretrainedConfig, trust_remote_code: bool = False,
                dtype: torch.dtype = torch.float32):
    """The HF model of ``hf_config`` with meta parameters (no storage, no initialisation) in ``dtype``."""
    with _parameters_on_meta():
        model = auto_class.from_config(hf_config, trust_remote_code=trust_remote_code)
    return model.to(dtype)


class _StandIns(TorchFunctionMode):
    """In-place operations on meta parameters (what ``_init_weights`` does) run on full-size CPU stand-ins."""

    def __init__(self):
        super().__init__()
        self.values: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(meta param) -> (param, stand-in)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        name = getattr(func, "__name__", "")
        target = args[0] if args else kwargs.get("tensor")  # torch.nn.init passes ``tensor=`` by keyword
        in_place = (name.endswith("_") and not name.startswith("__")) or name == "__setitem__"
        if not (in_place and isinstance(target, torch.Tensor) and target.is_meta):
            return func(*args, **kwargs)
        base = target if target._base is None else target._base
        if id(base) not in self.values:
            if base is not target or name == "__setitem__":
                raise WeightsError(f"initialisation writes part of a {tuple(base.shape)} parameter before the "
                                   f"whole of it ({name}); colonnade cannot initialise this model from scratch "
                                   f"without building it whole")
            self.values[id(base)] = (base, torch.empty(base.shape, dtype=base.dtype))
        stand_in = self.values[id(base)][1]
        view = stand_in if base is target else stand_in.as_strided(target.size(), target.stride(),
                                                                   target.storage_offset())
        others = [*args[1:], *(v for k, v in kwargs.items() if k != "tensor")]
        if any(isinstance(a, torch.Tensor) and a.is_meta for a in others):
            raise WeightsError(f"initialisation of a {tuple(base.shape)} parameter reads another parameter "
                               f"({name}); colonnade cannot initialise this model from scratch")
        if args:
            func(view, *args[1:], **kwargs)
        else:
            func(**dict(kwargs, tensor=view))
        return target

    def take(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The (meta parameter, full value) pairs written since the last call."""
        values, self.values = list(self.values.values()), {}
        return values


def _release_freed_memory() -> None:
    """Hand freed heap pages back to the system (glibc's ``malloc_trim``): full-size stand-ins freed between
    the kept slices would otherwise stay resident as holes in the heap (measured: +70 % at TP=2)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def _module_seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}/{name}".encode()).digest()[:8], "little") & (2 ** 63 - 1)


def _init_order(model: PreTrainedModel) -> list[tuple[str, nn.Module, Callable[[nn.Module], None]]]:
    """(name, module, the ``_init_weights`` that applies to it), children before parents, each module once:
    the order of transformers' ``initialize_weights``."""
    order, seen = [], set()

    def visit(module, name, init):
        if id(module) in seen:
            return
        seen.add(id(module))
        for child_name, child in module.named_children():
            child_init = child._init_weights if isinstance(child, PreTrainedModel) else init
            visit(child, f"{name}.{child_name}" if name else child_name, child_init)
        order.append((name, module, init))

    visit(model, "", model._init_weights)
    return order


def give_value(tensor: torch.Tensor, value: torch.Tensor) -> None:
    """Make the (meta) parameter or buffer ``tensor`` hold ``value``, keeping the Python object: modules, tied
    names and closures that hold it stay valid, and so do its attributes (``tensor_model_parallel``, ...) and
    gradient hooks (the sequence-parallel all-reduce)."""
    value = value.to(tensor.dtype)
    if value.shape != tensor.shape:
        raise WeightsError(f"a value of shape {tuple(value.shape)} for a tensor of shape {tuple(tensor.shape)}")
    if not tensor.is_meta:
        with torch.no_grad():
            tensor.copy_(value)
        return
    attributes = dict(tensor.__dict__)
    hooks = list((tensor._backward_hooks or {}).values())
    replacement = nn.Parameter(value, requires_grad=tensor.requires_grad) if isinstance(tensor, nn.Parameter) else value
    torch.utils.swap_tensors(tensor, replacement)
    tensor.__dict__.update(attributes)
    tensor._backward_hooks = None  # the old dict is not attached to the new storage's autograd state
    for hook in hooks:
        tensor.register_hook(hook)


class SeededInit:
    """From scratch: the model's own initialisation, one module at a time, seeded by (seed, module name)."""

    def __init__(self, seed: int):
        self.seed = seed

    def fill(self, full: PreTrainedModel, targets: dict[str, tuple[torch.Tensor, Shard]]) -> None:
        names_of: dict[int, list[str]] = {}
        for name, param in full.named_parameters(remove_duplicate=False):
            names_of.setdefault(id(param), []).append(name)
        stand_ins = _StandIns()
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            for name, module, init in _init_order(full):
                below = {f"{name}.{n}" if name else n for n, _ in module.named_parameters(remove_duplicate=False)}
                if not below & targets.keys():
                    continue
                torch.manual_seed(_module_seed(self.seed, name))
                with stand_ins:
                    init(module)
                for meta, value in stand_ins.take():
                    for target in names_of.get(id(meta), []):
                        if target in targets:
                            tensor, shard = targets[target]
                            give_value(tensor, shard.cut(value))
                    del value
                _release_freed_memory()


class StoredWeights:
    """Weights stored in a directory: safetensors (one file, or shards listed by an index) or pickled ``.bin``."""

    def __init__(self, directory: str | Path, what: str):
        self.directory, self.what = Path(directory), what
        self._open: dict[Path, object] = {}
        self._pickled: dict[str, torch.Tensor] | None = None
        self.files = self._files()

    def _files(self) -> dict[str, Path]:
        """Tensor name -> file."""
        for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            index = self.directory / index_name
            if index.is_file():
                weight_map = json.loads(index.read_text())["weight_map"]
                return {name: self.directory / file for name, file in weight_map.items()}
        for single in ("model.safetensors", "pytorch_model.bin"):
            if (self.directory / single).is_file():
                return {name: self.directory / single for name in self._names_in(self.directory / single)}
        raise WeightsError(f"{self.what}={self.directory}: no model.safetensors, no model.safetensors.index.json "
                           f"and no pytorch_model.bin there; point it at a directory written by save_pretrained")

    def _names_in(self, path: Path) -> list[str]:
        if path.suffix == ".safetensors":
            return list(self._handle(path).keys())
        return list(self._load_pickled(path))

    def _handle(self, path: Path):
        from safetensors import safe_open

        if path not in self._open:
            self._open[path] = safe_open(str(path), framework="pt")
        return self._open[path]

    def _load_pickled(self, path: Path) -> dict[str, torch.Tensor]:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except pickle.UnpicklingError as exc:
            raise WeightsError(f"{self.what}={self.directory}: its pickled weights hold more than tensors, so they "
                               f"were not loaded (loading them could run arbitrary code); convert the checkpoint "
                               f"to safetensors where it was made. ({str(exc).splitlines()[0][:120]})") from None
        self._pickled = {**(self._pickled or {}), **state}
        return state

    def shape(self, stored: str) -> tuple[int, ...]:
        path = self.files[stored]
        if path.suffix == ".safetensors":
            return tuple(self._handle(path).get_slice(stored).get_shape())
        return tuple(self._pickled_tensor(stored).shape)

    def slice_of(self, stored: str):
        """The stored tensor, indexable by slices: reading a slice of a safetensors file reads only its bytes."""
        path = self.files[stored]
        if path.suffix == ".safetensors":
            return self._handle(path).get_slice(stored)
        return self._pickled_tensor(stored)

    def read(self, stored: str, shard: Shard, dtype: torch.dtype) -> torch.Tensor:
        return shard.read(self.slice_of(stored), self.shape(stored), dtype)

    def _pickled_tensor(self, stored: str) -> torch.Tensor:
        if self._pickled is None or stored not in self._pickled:
            return self._load_pickled(self.files[stored])[stored]
        return self._pickled[stored]

    def fill(self, full: PreTrainedModel, targets: dict[str, tuple[torch.Tensor, Shard]]) -> None:
        """Stored names become the model's by transformers' conversion rules (``modeling.checkpoint_conversion``:
        renamed tensors, the base-model prefix, per-expert tensors fused)."""
        renamed, converted = plan(full, self.files)
        placed = {name: placement_of(group, self.shape) for name, group in converted.items()}
        self._check(full, {**{n: self.shape(s) for n, s in renamed.items()},
                           **{n: p.shape for n, p in placed.items() if p is not None}})
        with torch.no_grad():
            for name, (tensor, shard) in targets.items():
                if name in renamed:
                    give_value(tensor, self.read(renamed[name], shard, tensor.dtype))
                elif (placement := placed.get(name)) is not None:
                    give_value(tensor, read_placed(placement, shard, self.slice_of, self.shape, tensor.dtype))
            for name, group in converted.items():
                if placed[name] is None and targets.keys() & set(group.targets()):
                    for target, value in convert_whole(group, full, self.slice_of).items():
                        if target in targets:
                            tensor, shard = targets[target]
                            give_value(tensor, shard.cut(value))
        # What the model itself does not save (Marian's sinusoidal positions) is computed by its initialisation.
        given = {*renamed, *(t for group in converted.values() for t in group.targets())}
        not_saved = [re.compile(p) for p in getattr(full, "_keys_to_ignore_on_load_missing", None) or []]
        computed = {name: target for name, target in targets.items()
                    if name not in given and any(p.search(name) for p in not_saved)}
        if computed:
            SeededInit(0).fill(full, computed)

    def _check(self, full: nn.Module, stored_shapes: dict[str, tuple[int, ...]]) -> None:
        full_shapes = {n: tuple(t.shape) for n, t in {**dict(full.named_parameters(remove_duplicate=False)),
                                                       **dict(full.named_buffers())}.items()}
        reshaped = [f"{n}: {shape} stored, {full_shapes[n]} in this model"
                    for n, shape in stored_shapes.items() if n in full_shapes and shape != full_shapes[n]]
        if reshaped:
            raise WeightsError(f"{self.what}={self.directory} holds a different model: shapes differ: "
                               f"{', '.join(reshaped[:5])}{' ...' if len(reshaped) > 5 else ''}")


def materialize(full: nn.Module, local: nn.Module, kept: nn.Module, source: Any, tp_group: ProcessGroup | None) -> None:
    """Give values to every parameter and persistent buffer of ``kept`` (``local`` or a part of it), where
    ``local`` is ``full`` (both with meta parameters) after the tensor-parallel plan; ``source`` is a
    ``SeededInit``, ``StoredWeights`` or a checkpoint's (``training.checkpoint.CheckpointWeights``): anything
    with ``fill(full, targets)``; stored sources also overwrite the (real) buffers. A parameter left without a
    value is an error naming it."""
    kept_ids = {id(t) for t in [*kept.parameters(), *kept.buffers()]}
    persistent = dict(local.state_dict(keep_vars=True))
    tensors = {**dict(local.named_parameters(remove_duplicate=False)), **persistent}
    local_shards = shards(local, tp_group)
    targets = {name: (tensor, local_shards[name]) for name, tensor in tensors.items() if id(tensor) in kept_ids
               and (tensor.is_meta or not isinstance(source, SeededInit))}
    source.fill(full, targets)
    missing = sorted({name for name, (tensor, _) in targets.items() if tensor.is_meta})
    if missing:
        raise WeightsError(f"{getattr(source, 'what', 'model')}: no value for {missing[:5]}"
                           f"{' ...' if len(missing) > 5 else ''}"
                           + (" from the model's _init_weights" if isinstance(source, SeededInit) else
                              f" in {source.directory}"))
