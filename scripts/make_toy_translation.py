"""Write the toy translation task used by configs/translation_toy.yaml and the tests: English-like sentences
and their "translation" into a made-up language (every letter through a fixed substitution), as jsonl with
fields ``en`` and ``xx``. Deterministic; no download.

    python scripts/make_toy_translation.py configs/data/toy_translation
"""

from __future__ import annotations

import json
import random
import string
import sys
from pathlib import Path

WORDS = ("the a one two red blue green small big old new cat dog bird fish horse tree house river stone road "
         "city king child woman man sees finds keeps likes eats takes makes near under over with and from "
         "today here there quickly slowly").split()


def cipher(seed: int = 7) -> dict[str, str]:
    letters = list(string.ascii_lowercase)
    shuffled = letters[:]
    random.Random(seed).shuffle(shuffled)
    return dict(zip(letters, shuffled))


def translate(sentence: str, table: dict[str, str]) -> str:
    return " ".join("".join(table[c] for c in word) for word in sentence.split())


def sentences(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 7))) for _ in range(count)]


def write(out_dir: str | Path, train: int = 4000, valid: int = 200) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = cipher()
    for name, count, seed in (("train", train, 1), ("valid", valid, 2)):
        with (out / f"{name}.jsonl").open("w") as f:
            for sentence in sentences(count, seed):
                f.write(json.dumps({"en": sentence, "xx": translate(sentence, table)}) + "\n")
    return out


if __name__ == "__main__":
    write(sys.argv[1] if len(sys.argv) > 1 else "configs/data/toy_translation")
