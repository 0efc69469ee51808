"""python -m bench <command> [--help]"""

from __future__ import annotations

import sys

COMMANDS = {"overhead": "bench.overhead", "plan": "bench.plan", "tp": "bench.tp", "schedule": "bench.schedule", "comm": "bench.comm", "eval": "bench.eval", "sweep": "bench.sweep",
            "memory": "bench.memory", "llama-demo": "bench.llama_demo", "diverge": "bench.diverge",
            "cpu_adam": "bench.cpu_adam", "async_save": "bench.async_save"}


def main() -> int:
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        print(__doc__)
        print("commands:", ", ".join(COMMANDS))
        return 2
    import importlib

    importlib.import_module(COMMANDS[sys.argv[1]]).main(sys.argv[2:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
