"""Lean activations (``parallel.lean_activations``): the same computation as transformers' modules, keeping for
the backward only what Megatron's accounting (Korthikanti et al. 2022) keeps. Three substitutes, each chosen
from the module types of the model in hand, so a new architecture gets them without new code:

- **composite modules**: a leaf module (a norm, an activation) whose operations keep more than its input
  (found by running a meta-device copy of it once, ``probe``: RMSNorm's fp32 and normalised copies,
  NewGELU's pow / tanh / mul pieces) runs inside a non-reentrant checkpoint: it keeps its input, and its
  backward runs it again;
- **activation outputs**: the output of a parameterless elementwise module (an activation) that its parent's
  next operation keeps (``act(gate)`` that multiplies ``up``; GELU's output that the down projection keeps)
  is not kept: while the parent's forward runs, a saved-tensor hook packs it as "the activation of this
  input", and the backward computes it again from the input, which the activation keeps anyway;
- **dropout**: ``nn.Dropout`` keeps a 1-byte mask (``torch.native_dropout``, the same draws as
  ``F.dropout``) where torch's CPU path keeps a mask of the input's dtype (on CUDA ``F.dropout`` already
  does this). Functional dropout inside attention functions is left as torch runs it.

Every substitute computes the same values (recomputations of deterministic functions of the same inputs).
The classes are swapped for cached subclasses of the same name, so hooks, ``isinstance`` and the state dict
are untouched. Not applied with full recomputation (the block keeps only its input anyway).
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any, cast

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

OWN_PACKAGES = ("parallel", "modeling", "training")  # colonnade's own modules (collectives inside) are left alone


def probe(module: nn.Module) -> tuple[int, bool] | None:
    """(bytes a meta-device copy of leaf ``module`` keeps for the backward beyond its input, whether it is
    elementwise (output shaped as its input)), or None when it is not a one-tensor function."""
    parameters = list(module.parameters())
    width = parameters[0].shape[-1] if parameters else 8
    meta = copy.deepcopy(module).to("meta").train()
    own = {id(p) for p in meta.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor):
        if id(tensor) not in own and not isinstance(tensor._base, nn.Parameter):
            saved[tensor.untyped_storage()._cdata] = tensor.untyped_storage().nbytes()
        return tensor

    x = torch.zeros(2, 4, width, device="meta", requires_grad=True)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = meta(x)
    except Exception:  # noqa: BLE001 - any module that is not a function of one tensor (rotary embeddings, ...)
        return None
    if not isinstance(out, torch.Tensor) or not out.requires_grad:
        return None
    # a norm's per-row statistics (LayerNorm's mean and 1/std) are not worth a recomputation
    excess = sum(saved.values()) - x.untyped_storage().nbytes()
    return (excess if excess > x.untyped_storage().nbytes() // 2 else 0), out.shape == x.shape


class _Recipe:
    """A kept tensor (``kept``, the output of ``function(argument)`` or a view of it) not kept: computed again
    from ``argument`` (unchanged since)."""

    def __init__(self, function, argument: torch.Tensor, kept: torch.Tensor):
        self.function, self.argument, self.version = function, argument, argument._version
        self.view = (kept.size(), kept.stride(), kept.storage_offset())

    def compute(self) -> torch.Tensor:
        if self.argument._version != self.version:
            raise RuntimeError("parallel.lean_activations: an activation's input changed in place after the "
                               "forward; set parallel.lean_activations=false for this model")
        with torch.no_grad():
            return self.function(self.argument).as_strided(*self.view)


class _OuterPacked:
    def __init__(self, unpack, packed):
        self.unpack, self.packed = unpack, packed


class ActivationOutputs:
    """The activation outputs made while one module's forward runs, packed as recipes when an operation of
    that forward keeps them. Other saved tensors go to the hooks that were active outside (a memory meter's,
    a checkpoint's) as they would without this."""

    def __init__(self):
        self._made: dict[int, tuple[torch.Tensor, Any, torch.Tensor]] = {}
        self.open = False

    def remember(self, output: torch.Tensor, function: Callable[[torch.Tensor], torch.Tensor],
                 argument: torch.Tensor) -> None:
        if self.open and output.untyped_storage()._cdata != argument.untyped_storage()._cdata:
            # the output is held until the forward ends: its storage's address is not reused meanwhile
            self._made[output.untyped_storage()._cdata] = (output, function, argument)

    @contextmanager
    def recording(self):
        if self.open or not torch.is_grad_enabled():
            yield
            return
        outer = torch._C._autograd._top_saved_tensors_default_hooks(False)

        def pack(tensor):
            made = self._made.get(tensor.untyped_storage()._cdata)  # the output or a view of it (a reshape)
            if made is not None and made[0].dtype == tensor.dtype:
                return _Recipe(made[1], made[2], tensor)
            return tensor if outer is None else _OuterPacked(outer[1], outer[0](tensor))

        self.open = True
        try:
            with torch.autograd.graph.saved_tensors_hooks(pack, _unpack):
                yield
        finally:
            self.open = False
            self._made.clear()


def _unpack(packed):
    if isinstance(packed, _Recipe):
        return packed.compute()
    return packed.unpack(packed.packed) if isinstance(packed, _OuterPacked) else packed


def _same_name(subclass: type, cls: type) -> type:
    subclass.__name__, subclass.__qualname__, subclass.__module__ = cls.__name__, cls.__qualname__, cls.__module__
    return subclass


@functools.cache
def lean_leaf(cls: type, recomputed: bool, remembered: bool) -> type:
    """``cls`` whose forward runs in a checkpoint (``recomputed``) and tells its parent's ``ActivationOutputs``
    what it made from what (``remembered``)."""
    def forward(self, x, *args, **kwargs):
        if recomputed and torch.is_grad_enabled():
            out = checkpoint(cls.forward, self, x, *args, use_reentrant=False, preserve_rng_state=False, **kwargs)
        else:
            out = cls.forward(self, x, *args, **kwargs)
        outputs = self.__dict__.get("activation_outputs")
        if remembered and outputs is not None and not args and not kwargs:
            outputs.remember(out, functools.partial(cls.forward, self), x)
        return out

    return _same_name(type(cls.__name__, (cls,), {"forward": forward, "lean": True}), cls)


@functools.cache
def recording_parent(cls: type) -> type:
    """``cls`` whose forward packs its activations' outputs as recipes (``ActivationOutputs``)."""
    def forward(self, *args, **kwargs):
        with self.activation_outputs.recording():
            return cls.forward(self, *args, **kwargs)

    return _same_name(type(cls.__name__, (cls,), {"forward": forward}), cls)


class LeanDropout(nn.Dropout):
    """``nn.Dropout`` keeping a boolean mask: ``torch.native_dropout`` draws what ``F.dropout`` draws."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and 0 < self.p < 1 and not self.inplace:
            return torch.native_dropout(x, self.p, True)[0]
        return super().forward(x)


def _candidate(module: nn.Module) -> bool:
    """A leaf of transformers' (or torch's) whose parameters are vectors: a norm or an activation."""
    return (not getattr(module, "lean", False) and not any(True for _ in module.children())
            and not any(True for _ in module.buffers())
            and type(module).__module__.split(".")[0] not in OWN_PACKAGES
            and not isinstance(module, nn.Dropout) and not getattr(module, "inplace", False)
            and all(p.dim() <= 1 for p in module.parameters()))


def substitute(parent: nn.Module, child: nn.Module, decisions: dict[type, Any]) -> None:
    """Swap ``child`` (a child of ``parent``) for its lean class, if its type has one."""
    if type(child) is nn.Dropout:
        child.__class__ = LeanDropout
        return
    if not _candidate(child):
        return
    cls: Any = type(child)
    if cls not in decisions:
        found = probe(child)
        decisions[cls] = None if found is None else (found[0] > 0, found[1] and not list(child.parameters()))
    if decisions[cls] is None or decisions[cls] == (False, False):
        return
    recomputed, remembered = decisions[cls]
    child.__class__ = lean_leaf(cls, recomputed, remembered)
    if remembered:
        if "activation_outputs" not in parent.__dict__:
            setattr(parent, "activation_outputs", ActivationOutputs())  # noqa: B010 - not a tensor or module
            parent.__class__ = recording_parent(cast(Any, type(parent)))
        setattr(child, "activation_outputs", parent.activation_outputs)  # noqa: B010


def apply(model: nn.Module, enabled: bool, recompute_mode: str = "none") -> dict[str, str]:
    """Swap the modules of ``model`` (before pipeline chunks are cut) for their lean classes; returns
    {class name: what was substituted}."""
    if not enabled or recompute_mode == "full":
        return {}
    decisions: dict[type, Any] = {}
    for parent in list(model.modules()):
        for child in list(parent.children()):
            substitute(parent, child, decisions)
    done = {cls.__name__: ("recomputed" if d[0] else "") + (" + output recomputed" if d[1] else "")
            for cls, d in decisions.items() if d is not None and d != (False, False)}
    return {name: what.lstrip(" +") for name, what in done.items()}
