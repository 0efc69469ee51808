"""colonnade entry point.

    python train.py --config configs/quickstart.yaml [--set key=value ...]
    torchrun --nproc_per_node 2 train.py --config ...
    deepspeed --num_gpus 2 train.py --config ...
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import yaml


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Train a Hugging Face causal LM with DeepSpeed ZeRO.")
    parser.add_argument("--config", required=True, help="YAML run config, e.g. configs/quickstart.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set optim.lr=3e-4 (repeatable)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the effective config and the generated DeepSpeed JSON, then exit")
    parser.add_argument("--deepspeed_config", default=None, metavar="FILE",
                        help="an existing DeepSpeed JSON; validated against the YAML")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None,
                        help="set by the deepspeed launcher; the LOCAL_RANK environment variable is used")
    args, unknown = parser.parse_known_args(argv)
    args.overrides += wandb_agent_overrides(unknown, parser)
    return args


def wandb_agent_overrides(unknown: list[str], parser: argparse.ArgumentParser) -> list[str]:
    """``wandb agent`` passes sweep parameters as ``--key=value``; dotted keys become ``--set key=value``."""
    overrides, rest = [], list(unknown)
    while rest:
        item = rest.pop(0)
        key, sep, value = item[2:].partition("=") if item.startswith("--") else ("", "", "")
        if "." not in key:
            parser.error(f"unrecognized argument {item!r} (config keys go as --set key=value or --key.sub=value)")
        if not sep:
            if not rest:
                parser.error(f"{item} needs a value")
            value = rest.pop(0)
        overrides.append(f"{key}={value}")
    return overrides


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from training.config import ConfigError, for_world, load
    from training.deepspeed_config import deepspeed_config, load_user_deepspeed_config
    from training.faults import CollectiveTimeout, PeerLost, TrainingStopped, timeout_reported

    try:
        cfg = load(args.config, args.overrides)
        if args.print_config:
            world = int(os.environ.get("WORLD_SIZE", "1"))
            cfg = for_world(cfg, world)
            from training.describe import layout, planned_hidden_size, planned_model

            ds = (load_user_deepspeed_config(args.deepspeed_config, cfg, world) if args.deepspeed_config
                  else deepspeed_config(cfg, world, planned_hidden_size(cfg)))

            print(f"# model: {planned_model(cfg)}")
            print(f"# layout: {layout(cfg, world)}")
            print(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
            print(f"# DeepSpeed JSON (world size {world})")
            print(json.dumps(ds, indent=2))
            return 0
        import training

        training.run(cfg, args.deepspeed_config)
    except (ConfigError, OSError, ValueError) as exc:  # bad input, unreadable / unwritable paths
        return _fail(f"error: {exc}", 2)
    except TrainingStopped as exc:  # every rank stopped after the same step: rank 0 says where
        return _fail(str(exc), exc.exit_code, only_rank0=True)
    except (CollectiveTimeout, PeerLost) as exc:  # every rank names the collective it waited in / the lost peer
        code = _fail(f"error: {exc}", 4, rank0_reports=False)
        timeout_reported()
        return code
    return 0


# A rank other than 0 waits this long before reporting an error, so that when rank 0 finds the same error
# (the usual case: every rank checks the same input) rank 0's report reaches the console before the launcher,
# seeing the first rank exit, kills the others; an error only that rank found is still reported after it.
REPORT_GRACE_S = 10.0


def _fail(message: str, code: int, *, rank0_reports: bool = True, only_rank0: bool = False) -> int:
    rank = int(os.environ.get("RANK", "0"))
    if only_rank0 and rank != 0:
        return code
    if rank0_reports and rank != 0:
        time.sleep(REPORT_GRACE_S)
    print(f"colonnade (rank {rank}): {message}", file=sys.stderr, flush=True)
    return code


def launched(argv: list[str] | None = None) -> None:
    """``main`` as a launched process runs it: every outcome an exit code and at most one line, then the
    process ends (``finish_process``)."""
    from training.lifecycle import finish_process

    try:
        code = main(argv)
    except SystemExit as exc:  # argparse: --help (0) and usage errors (2), already printed
        code = exc.code if isinstance(exc.code, int) else 0 if exc.code is None else _fail(str(exc.code), 1)
    except KeyboardInterrupt:  # a second Ctrl-C: the first one's orderly stop and save were not waited for
        code = _fail("interrupted by a second Ctrl-C: stopped at once, without saving the current step; "
                     "continue from the newest checkpoint with --set train.resume=auto", 130, only_rank0=True)
    except BaseException:  # printed, then the process ends without the interpreter's shutdown (see finish_process)
        import traceback

        traceback.print_exc()
        code = 1
    finish_process(code)


if __name__ == "__main__":
    launched()
