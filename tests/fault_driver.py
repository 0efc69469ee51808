"""``train.py`` with a fault injected, for launcher-level tests (run under torchrun like train.py):

    torchrun --nproc_per_node 2 tests/fault_driver.py --stall-rank 1 --stall-step 3 -- --config run.yaml

--stall-rank R --stall-step S   at step S, rank R waits inside a collective that no other rank enters (a
                                barrier on a side group made at step 1), so the others wait inside the
                                step's collectives for it: both sides are stalled inside a collective
--slow-report-rank R            rank R takes 3 s longer to print its error (a loaded machine), so the other
                                ranks must wait for it before exiting or the launcher kills it mid-report
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--stall-rank", type=int, default=None)
    parser.add_argument("--stall-step", type=int, default=1)
    parser.add_argument("--sigterm-rank", type=int, default=None)
    parser.add_argument("--sigterm-step", type=int, default=1)
    parser.add_argument("--config-error-rank", type=int, default=None)
    parser.add_argument("--slow-save-step", type=int, default=None)
    parser.add_argument("--slow-save-s", type=float, default=0.0)
    parser.add_argument("--slow-report-rank", type=int, default=None)
    args, rest = parser.parse_known_args()
    rest = rest[1:] if rest[:1] == ["--"] else rest

    import torch.distributed as dist

    from training.pipeline import PipelineRunner
    from training.steps import DataParallelStep

    rank = int(os.environ.get("RANK", "0"))
    side = {}

    def inject(cfg, step):
        if "group" not in side:  # collective: every rank makes it at the first step
            side["group"] = dist.new_group(list(range(dist.get_world_size())),
                                           timeout=timedelta(seconds=cfg.parallel.timeout_s))
        if rank == args.stall_rank and step + 1 == args.stall_step:
            print(f"fault_driver: rank {rank} stalls in a collective at step {step + 1}", file=sys.stderr, flush=True)
            dist.barrier(group=side["group"])
        if rank == args.sigterm_rank and step + 1 == args.sigterm_step:
            os.kill(os.getpid(), signal.SIGTERM)

    for step_class in (DataParallelStep, PipelineRunner):  # the data-parallel and the pipeline step
        def stalling_train(self, batches, step, original=step_class.train):
            inject(self.cfg, step)
            return original(self, batches, step)

        step_class.train = stalling_train
    if args.slow_save_step is not None:  # 0: every save
        _slow_down_save(f"step_{args.slow_save_step:07d}" if args.slow_save_step else "step_", args.slow_save_s)
    if rank == args.config_error_rank:
        import training.config as config

        def failing_load(path, overrides=()):
            raise config.ConfigError(f"data.train_files: only rank {rank} cannot read them (injected)")

        config.load = failing_load
    import train

    if rank == args.slow_report_rank:
        _slow_down_report(train)
    train.launched(rest)


def _slow_down_report(train) -> None:
    import time

    original = train._fail

    def slow_fail(*args, **kwargs):
        time.sleep(3.0)
        return original(*args, **kwargs)

    train._fail = slow_fail


def _slow_down_save(tag: str, seconds: float) -> None:
    import time

    import training.checkpoint.saving as saving

    original = saving.write_safetensors

    def slow_write(path, *args, **kwargs):
        if tag in str(path):
            time.sleep(seconds)
        return original(path, *args, **kwargs)

    saving.write_safetensors = slow_write


if __name__ == "__main__":
    main()
