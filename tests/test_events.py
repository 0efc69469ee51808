"""The observer contract (training/events.py) as a run keeps it: which phases, in which order, for which step,
with which records, for the data-parallel and the pipeline step, a fresh start and a resume."""

from __future__ import annotations

import pytest

from tests.dist import run_ranks
from tests.helpers import tiny_config, write_corpus


def _recorded_events(cfgs):
    """Rank function: run each config with an observer that records every event; return them per config."""
    from training import run
    from training.events import Observer

    class Recorder(Observer):
        def __init__(self):
            self.events = []

        def on_built(self, built):
            self.events.append(("built", type(built.step).__name__, built.engine is not None))

        def on_phase_start(self, phase, step):
            self.events.append(("start", phase, step))

        def on_phase_end(self, phase, step, record):
            self.events.append(("end", phase, step, sorted(record) if record else None))

    out = []
    for cfg in cfgs:
        recorder = Recorder()
        run(cfg, observers=[recorder])
        out.append(recorder.events)
    return out


STEP_KEYS = ["grad_norm", "loss", "lr", "skipped_steps", "step", "step_time_s", "tokens_per_s"]
DP_STEP_KEYS = sorted(STEP_KEYS + ["dp_bytes_sent"])  # where there is a data-parallel group
EVAL_KEYS = ["eval_loss", "perplexity", "step"]


def _step(n: int, keys: list[str]) -> list[tuple]:
    return [("start", "step", n), ("start", "optimizer", n), ("end", "optimizer", n, None),
            ("end", "step", n, keys)]


@pytest.mark.multiprocess
def test_a_run_tells_its_observers_every_phase_in_order(tmp_path):
    """Data-parallel (DP=2) and pipeline (PP=2) runs of 4 steps with an eval and a save every 2 steps and the
    export; then the data-parallel run resumed to step 6: 'resume' after 'load', the steps from 5."""
    corpus = write_corpus(tmp_path / "corpus")
    common = dict(train__steps=4, train__eval_every=2, train__save_every=2, train__export_hf=True,
                  parallel={"zero_stage": 1})
    dp = tiny_config(tmp_path / "dp", corpus, **common)
    pp = tiny_config(tmp_path / "pp", corpus, **{**common, "parallel": {"zero_stage": 1, "pipeline": 2}})
    resumed = tiny_config(tmp_path / "dp", corpus, **{**common, "train__steps": 6, "train__resume": "auto"})
    per_rank = run_ranks(_recorded_events, 2, [dp, pp, resumed], timeout=600)
    for rank_events in per_rank:
        dp_events, pp_events, resumed_events = rank_events
        def middle(first: int, last: int, keys: list[str] = DP_STEP_KEYS) -> list[tuple]:
            events = []
            for n in range(first, last + 1):
                events += _step(n, keys)
                if n % 2 == 0:
                    events += [("start", "eval", n), ("end", "eval", n, EVAL_KEYS),
                               ("start", "save", n), ("end", "save", n, None)]
            return events

        def whole(built: str, keys: list[str]) -> list[tuple]:
            return ([("start", "load", 0), ("end", "load", 0, None), ("built", built, True), ("start", "train", 0)]
                    + middle(1, 4, keys)
                    + [("end", "train", 0, None), ("start", "export", 4), ("end", "export", 4, None)])

        assert dp_events == whole("DataParallelStep", DP_STEP_KEYS)
        assert pp_events == whole("PipelineRunner", STEP_KEYS)  # 2 stages, no data-parallel group
        assert resumed_events == ([("start", "load", 0), ("end", "load", 0, None), ("start", "resume", 0),
                                   ("end", "resume", 0, None), ("built", "DataParallelStep", True),
                                   ("start", "train", 4)] + middle(5, 6)
                                  + [("end", "train", 4, None), ("start", "export", 6), ("end", "export", 6, None)])


@pytest.mark.unit
def test_an_unknown_phase_is_refused():
    from training.events import Observers

    with pytest.raises(ValueError, match="unknown phase 'stpe'; the phases are load, resume, train, step"):
        Observers().start("stpe", 1)
