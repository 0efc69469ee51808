"""``docs/config.md``, generated from the schema in ``training/config_schema.py``: every key, its type, default and
meaning. ``python -m training.config_doc`` rewrites it; a test fails when the committed file is stale."""

from __future__ import annotations

import sys
import typing
from pathlib import Path

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from training.config import RunConfig

DOC = Path(__file__).resolve().parents[1] / "docs" / "config.md"
HEADER = """# Run configuration reference

Generated from the schema in `training/config_schema.py` by `python -m training.config_doc` (a test fails when this
file and the schema disagree). One YAML file holds these sections; `--set section.key=value` overrides a key
(the value read as YAML). Unknown keys are errors naming the nearest valid one.
"""


def _type_name(annotation) -> str:
    text = str(annotation) if typing.get_origin(annotation) else getattr(annotation, "__name__", str(annotation))
    return text.replace("typing.", "").replace("NoneType", "None")


def _default(field) -> str:
    if field.is_required():
        return "required"
    value = field.default_factory() if field.default_factory is not None else field.default
    if value is PydanticUndefined:
        return "required"
    return "null" if value is None else f"`{value!r}`" if not isinstance(value, str) else f"`{value}`"


def _rows(section: type[BaseModel], prefix: str) -> list[str]:
    rows = []
    for name, field in section.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            rows += _rows(annotation, f"{prefix}{name}.")
            continue
        meaning = (field.description or "").replace("|", "\\|")
        rows.append(f"| `{prefix}{name}` | {_type_name(annotation).replace('|', chr(92) + '|')} | "
                    f"{_default(field)} | {meaning} |")
    return rows


def render() -> str:
    lines = [HEADER]
    for name, field in RunConfig.model_fields.items():
        annotation = field.annotation
        lines += [f"## `{name}`", ""]
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            lines += ["| key | type | default | meaning |", "|---|---|---|---|", *_rows(annotation, f"{name}."), ""]
        else:
            lines += ["| key | type | default | meaning |", "|---|---|---|---|",
                      *[r for r in _rows(RunConfig, "") if r.startswith(f"| `{name}`")], ""]
    return "\n".join(lines)


def main() -> int:
    DOC.parent.mkdir(exist_ok=True)
    DOC.write_text(render())
    print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
