"""A variant: one labelled set of config overrides and the number of processes it runs on, what a
``--layout tensor=2,pipeline=2,data=2,zero=1`` argument of ``bench memory``, ``bench plan`` and ``bench
diverge`` names. Its parallel layout (tensor x pipeline x data x context) gives the processes; the ZeRO stage, the
expert degree (carved from data) and, for ``bench diverge``, any dotted config key ride along as overrides.
``context=N`` is ``parallel.context=N`` and N times the processes: ``data`` counts the replicas (different
samples), the run's data-parallel group (ZeRO, the gradient reduction) their ranks times N. Three words name
settings that change what a layout keeps, not its processes: ``sequence_parallel`` (``parallel.sequence_parallel``),
``recompute=none|selective|full`` (``parallel.activation_checkpointing``) and ``lean=0|1``
(``parallel.lean_activations``)."""

from __future__ import annotations

from typing import NamedTuple

# the variant keys that are config keys; ``data`` is not one: the data-parallel degree follows from the processes
CONFIG_KEYS = {"tensor": "parallel.tensor", "pipeline": "parallel.pipeline", "zero": "parallel.zero_stage",
               "expert": "parallel.expert", "context": "parallel.context"}
DEGREES = ("tensor", "pipeline", "data", "context")
SETTINGS = {"sequence_parallel": ("parallel.sequence_parallel", ("",)),
            "recompute": ("parallel.activation_checkpointing", ("none", "selective", "full")),
            "lean": ("parallel.lean_activations", ("0", "1"))}


class Variant(NamedTuple):
    label: str  # as given: 'tensor=2,pipeline=2,data=1,zero=1'
    sets: list[str]  # config overrides: ['parallel.tensor=2', 'parallel.pipeline=2', 'parallel.zero_stage=1']
    nproc: int  # tensor x pipeline x data x context


def parse_variant(text: str, prog: str = "bench memory") -> Variant:
    """'tensor=2,pipeline=2,data=1,zero=1' -> (label, config overrides, processes); anything else is one line
    and exit code 2 (``bench.cli.fail``)."""
    degrees = dict.fromkeys(DEGREES, 1)
    sets = []
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        if key in SETTINGS and value in SETTINGS[key][1]:
            name = SETTINGS[key][0]
            sets.append(f"{name}={ {'': 'true', '0': 'false', '1': 'true'}.get(value, value)}")
            continue
        if key not in {*degrees, *CONFIG_KEYS} or not value.isdigit():
            from bench.cli import fail

            fail(prog, f"--layout {text!r}: {item!r} is not one of "
                       f"{', '.join(k + '=N' for k in (*DEGREES, 'zero', 'expert'))}, sequence_parallel, "
                       f"recompute=none|selective|full, lean=0|1")
        if key in degrees:
            degrees[key] = int(value)
        if key in CONFIG_KEYS:
            sets.append(f"{CONFIG_KEYS[key]}={value}")
    return Variant(text, sets, degrees["tensor"] * degrees["pipeline"] * degrees["data"] * degrees["context"])
