"""``train.py`` with a fault injected, for launcher-level tests (run under torchrun like train.py):

    torchrun --nproc_per_node 2 tests/fault_driver.py --stall-rank 1 --stall-step 3 -- --config run.yaml

--stall-rank R --stall-step S   rank R sleeps (does not enter the step's collectives) at step S
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--stall-rank", type=int, default=None)
    parser.add_argument("--stall-step", type=int, default=1)
    parser.add_argument("--stall-seconds", type=float, default=3600.0)
    args, rest = parser.parse_known_args()
    rest = rest[1:] if rest[:1] == ["--"] else rest

    import training.loop as loop

    rank = int(os.environ.get("RANK", "0"))
    original = loop._data_parallel_step

    def stalling_step(cfg, engine, batches, groups, step, device):
        if rank == args.stall_rank and step + 1 == args.stall_step:
            print(f"fault_driver: rank {rank} stalls at step {step + 1}", file=sys.stderr, flush=True)
            time.sleep(args.stall_seconds)
        return original(cfg, engine, batches, groups, step, device)

    loop._data_parallel_step = stalling_step
    import train

    try:
        code = train.main(rest)
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    loop.finish_process(code)


if __name__ == "__main__":
    main()
