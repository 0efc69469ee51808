"""A short description of the machine a benchmark ran on, stored with every result."""

from __future__ import annotations

import datetime
import os
import platform


def describe() -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {"host": platform.node(), "cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "date": datetime.date.today().isoformat()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def slug(info: dict) -> str:
    device = info.get("gpu") or f"cpu{info['cores']}"
    return f"{device.replace(' ', '-').lower()}-{info['date']}"


def publish(result: dict, text: str, out: str | None) -> None:
    """Print a benchmark's report and, with ``out``, store it there as results.json and report.md."""
    import json
    from pathlib import Path

    print(text)
    if out:
        directory = Path(out)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "results.json").write_text(json.dumps(result, indent=1))
        (directory / "report.md").write_text(text)
