"""The verdicts of ``bench coverage``: a run's cell from its ranks' outcomes and the one-process reference
(``equal`` / ``refused: reason`` / ``failed: error``), and the check of colonnade's Hugging Face export against
the reference."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.coverage_ranks import Outcome, last_line, logit_batch

REL_TOL = 1e-5  # loss and gradient norm per step, relative: only the fp32 summation order differs
LOGITS_TOL = 1e-4  # the export's logits, max |difference| over the largest |logit| (see docs/benchmarks.md)


def run_verdict(outcomes: list[Outcome]) -> tuple[str, list[dict] | None]:
    """(the cell without the comparison, rank 0's step records when every rank trained): ``failed: ...`` when
    any rank raised (its traceback's last line) or was lost, ``refused: reason`` when the ranks refused the
    input, ``ok`` when every rank trained."""
    for rank, outcome in enumerate(outcomes):
        if outcome.status == "error":
            return f"failed: rank {rank}: {last_line(outcome.value)}", None
    refused = [o.value for o in outcomes if o.status == "refused"]
    if refused:
        return f"refused: {refused[0]}", None
    lost = next(((rank, o) for rank, o in enumerate(outcomes) if o.status == "lost"), None)
    if lost:
        return f"failed: rank {lost[0]} lost ({lost[1].value})", None
    steps = outcomes[0].value["steps"]
    uneven = [rank for rank, o in enumerate(outcomes) if len(o.value["steps"]) != len(steps)]
    if uneven:
        return f"failed: rank {uneven[0]} logged {len(outcomes[uneven[0]].value['steps'])} steps, rank 0 " \
               f"{len(steps)}", None
    return "ok", steps


def relative(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-30)


def compare_steps(steps: list[dict], reference: list[dict], tol: float = REL_TOL) -> str:
    """``equal`` when every step's loss and gradient norm is within ``tol`` of the reference's, else ``failed:``
    naming the first that is not."""
    if len(steps) != len(reference):
        return f"failed: {len(steps)} steps logged, the one-process reference {len(reference)}"
    for ours, ref in zip(steps, reference):
        for key in ("loss", "grad_norm"):
            if relative(ours[key], ref[key]) > tol:
                return (f"failed: differs from one process at step {ref['step']}: {key} {ours[key]:.7g} vs "
                        f"{ref[key]:.7g} (relative {relative(ours[key], ref[key]):.1e} > {tol:g})")
    return "equal"


def _rel_max(a: Any, b: Any) -> float:
    """max |a - b| over max |b|."""
    return float((a.double() - b.double()).abs().max()) / max(float(b.double().abs().max()), 1e-30)


def check_export(export_dir: Path, reference_file: Path, seq_len: int, tol: float = LOGITS_TOL) -> dict[str, Any]:
    """``AutoModelForCausalLM.from_pretrained(export_dir)`` against the one-process run's trained model: no
    missing, unexpected or mis-shaped weights; every weight and the logits on a fixed batch compared (max
    |difference| over the largest value). ``status``: ``equal`` when the logits are within ``tol``."""
    import torch
    from transformers import AutoModelForCausalLM

    reference = torch.load(reference_file, weights_only=True)
    model, info = AutoModelForCausalLM.from_pretrained(str(export_dir), output_loading_info=True,
                                                       dtype=torch.float32)
    problems = [f"{kind} {', '.join(map(str, names[:3]))}" for kind, names in
                (("missing", info.get("missing_keys", [])), ("unexpected", info.get("unexpected_keys", [])),
                 ("mis-shaped", info.get("mismatched_keys", []))) if names]
    if problems:
        return {"status": f"failed: from_pretrained: {'; '.join(problems)}"}
    state = model.state_dict()
    absent = sorted(set(reference["state"]) - set(state))
    if absent:
        return {"status": f"failed: the reloaded model has no {', '.join(absent[:3])}"}
    weights = max(_rel_max(state[name], tensor) for name, tensor in reference["state"].items())
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=logit_batch(model.config.vocab_size, seq_len), use_cache=False).logits
    rel = _rel_max(logits, reference["logits"])
    status = "equal" if rel <= tol else f"failed: logits differ from the one-process model's by {rel:.1e} > {tol:g}"
    changed = changed_on_load(export_dir, state)
    if rel > tol and changed:
        status += (f"; from_pretrained changes {', '.join(changed[:2])} on load (the exported files hold other "
                   f"values)")
    return {"status": status, "logits_rel": rel, "weights_rel": weights, "changed_on_load": changed}


def changed_on_load(export_dir: Path, state: dict[str, Any]) -> list[str]:
    """The tensors of the exported safetensors files that the reloaded model (``state``) does not hold as
    written: transformers changing a weight on load (e.g. zeroing a tied embedding's padding row)."""
    import torch
    from safetensors.torch import load_file

    changed = []
    for path in sorted(export_dir.glob("*.safetensors")):
        for name, tensor in load_file(str(path)).items():
            if name in state and not torch.equal(state[name], tensor):
                changed.append(name)
    return changed
