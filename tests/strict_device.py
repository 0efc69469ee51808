"""Strict device mode for tests: catch a host tensor handed to a collective by colonnade's code, on a CPU box.

Under NCCL every tensor of a collective or p2p operation must be on the GPU. On a CPU-only machine every
tensor is on the CPU, so the check follows where a tensor was *made* instead of where it is:

- host-born: made by a factory (``torch.tensor``, ``zeros``, ``empty``, ...) without a ``device`` argument,
  or moved there with ``.cpu()`` / ``.to("cpu")``; and anything computed from host-born tensors only
  (a ``torch.device`` object is trusted: it names where the model or the group runs);
- everything else (parameters, activations, gradients, and tensors made with an explicit ``device``, which
  in colonnade comes from ``parallel.comm.comm_device``) is where the model runs: the GPU under NCCL.

A host-born tensor passed to ``torch.distributed`` by a function of ``parallel/``, ``training/`` or
``modeling/`` is recorded as a violation (DeepSpeed's own collectives are DeepSpeed's business). Object
collectives (``broadcast_object_list``, ``gather_object``) place their tensors themselves and are not checked.

    with StrictDevice() as strict:
        run(cfg)
    assert not strict.violations
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

ROOT = Path(__file__).resolve().parents[1]
OURS = tuple(str(ROOT / package) + "/" for package in ("parallel", "training", "modeling"))
HOST = "_strict_device_host_born"
FACTORIES = {torch.tensor, torch.zeros, torch.ones, torch.empty, torch.full, torch.arange, torch.as_tensor,
             torch.rand, torch.randn, torch.randint, torch.eye, torch.linspace, torch.scalar_tensor}
# isend / irecv are checked through batch_isend_irecv: P2POp accepts only torch's own functions, not wrappers.
CHECKED = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter", "reduce_scatter_tensor",
           "broadcast", "reduce", "send", "recv", "all_to_all_single", "batch_isend_irecv")


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)
    elif isinstance(value, dist.P2POp):
        yield value.tensor


def _is_host(tensor: torch.Tensor) -> bool:
    return getattr(tensor, HOST, False)


def _to_host(args, kwargs) -> bool | None:
    """For ``Tensor.to``: True when it moves to the CPU by name (the string "cpu"), False for a device object
    (from ``comm_device``, the engine or another tensor: where the model runs), None when it names no device
    (a dtype change keeps the input's placement)."""
    for value in (kwargs.get("device"), *args[1:]):
        if isinstance(value, str) or isinstance(value, torch.device):
            return isinstance(value, str) and value.startswith("cpu")
        if isinstance(value, torch.Tensor):
            return _is_host(value)
    return None


class _HostTracker(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in FACTORIES:
            host = kwargs.get("device") is None
        elif func is torch.Tensor.cpu:
            host = True
        elif func is torch.Tensor.to and _to_host(args, kwargs) is not None:
            host = _to_host(args, kwargs)
        else:
            inputs = list(_tensors((args, kwargs)))
            host = bool(inputs) and all(_is_host(t) for t in inputs)
        if host:
            for tensor in _tensors(out):
                setattr(tensor, HOST, True)
        return out


def _our_caller() -> str | None:
    """'file:line' of the colonnade function that called into torch.distributed, or None."""
    frame = sys._getframe(2)
    while frame is not None and (frame.f_globals.get("__name__", "").startswith("torch")
                                 or frame.f_globals.get("__name__") == "parallel.flight"):  # its recording wrapper
        frame = frame.f_back
    if frame is not None and frame.f_code.co_filename.startswith(OURS):
        return f"{Path(frame.f_code.co_filename).relative_to(ROOT)}:{frame.f_lineno}"
    return None


class StrictDevice:
    """Track host-born tensors and record every collective of ours that receives one (``violations``)."""

    def __init__(self):
        self.violations: list[str] = []
        self.checked = 0
        self._originals = {}
        self._mode = _HostTracker()

    def _wrap(self, name: str, original):
        @functools.wraps(original)
        def checked(*args, **kwargs):
            caller = _our_caller()
            if caller is not None:
                self.checked += 1
                host = [t for t in _tensors((args, kwargs)) if _is_host(t)]
                if host:
                    self.violations.append(f"{caller}: dist.{name} got a host tensor {tuple(host[0].shape)} "
                                           f"{host[0].dtype}")
            return original(*args, **kwargs)

        return checked

    def __enter__(self) -> "StrictDevice":
        for name in CHECKED:
            self._originals[name] = getattr(dist, name)
            setattr(dist, name, self._wrap(name, self._originals[name]))
        self._module_to = torch.nn.Module.to
        torch.nn.Module.to = _placed_with_module(self._module_to)
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._mode.__exit__(*exc)
        torch.nn.Module.to = self._module_to
        for name, original in self._originals.items():
            setattr(dist, name, original)


def _placed_with_module(module_to):
    """``Module.to(device)`` (DeepSpeed places the model with it): its parameters and buffers are where the model
    runs from then on, the GPU under NCCL, whatever factory made them on the CPU."""
    @functools.wraps(module_to)
    def to(module, *args, **kwargs):
        moved = module_to(module, *args, **kwargs)
        for tensor in [*moved.parameters(), *moved.buffers()]:
            if _is_host(tensor):
                delattr(tensor, HOST)
        return moved

    return to
