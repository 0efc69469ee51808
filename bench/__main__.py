"""python -m bench <command> [--help]"""

from __future__ import annotations

import sys

COMMANDS = {"overhead": "bench.overhead", "plan": "bench.plan", "tp": "bench.tp", "schedule": "bench.schedule",
            "comm": "bench.comm", "eval": "bench.eval", "sweep": "bench.sweep",
            "memory": "bench.memory", "llama-demo": "bench.llama_demo", "diverge": "bench.diverge",
            "cpu_adam": "bench.cpu_adam", "async_save": "bench.async_save", "coverage": "bench.coverage",
            "generate": "bench.generate", "compression": "bench.compression", "slow-link": "bench.slow_link",
            "context": "bench.context", "loss": "bench.loss", "compile": "bench.compile"}


def main() -> int:
    command = sys.argv[1] if len(sys.argv) > 1 else None
    if command in ("-h", "--help"):
        print(__doc__)
        print("commands:", ", ".join(COMMANDS))
        return 0
    if command not in COMMANDS:
        from bench.cli import fail

        what = "no command given" if command is None else f"unknown command {command!r}"
        fail("python -m bench", f"{what}; choose one of {', '.join(COMMANDS)} (python -m bench <command> --help)")
    import importlib

    importlib.import_module(COMMANDS[command]).main(sys.argv[2:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
