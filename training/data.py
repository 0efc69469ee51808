"""Local text / jsonl / parquet files -> tokens (cached by ``datasets``) -> packed ``seq_len`` blocks,
and the deterministic, data-parallel-sharded order in which training reads them.

The order depends only on the seed and the global sample index: sample ``g`` of the run is block
``permutation(seed, epoch = g // N)[g % N]``. Step ``s`` consumes global samples
``[s * B, (s + 1) * B)`` with ``B = micro * accum * dp``; micro-batch ``k`` of data-parallel rank ``r``
takes ``micro`` consecutive ones starting at ``s * B + (k * dp + r) * micro``. Resuming at step ``s``
therefore needs nothing but ``s``, and any split of ``B`` over (dp, accum) sees the same samples.
"""

from __future__ import annotations

import codecs
import contextlib
import glob
import json
import os
import sysconfig
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from parallel.context import document_positions

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedTokenizerBase

FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def expand_files(patterns: list[str], key: str) -> list[str]:
    """Expand globs, ``~``, ``$VARS`` and ``{stdlib}``; every pattern must match at least one file."""
    files: list[str] = []
    stdlib = sysconfig.get_paths()["stdlib"]
    for pattern in patterns:
        expanded = os.path.expanduser(os.path.expandvars(pattern.replace("{stdlib}", stdlib)))
        matches = sorted(p for p in glob.glob(expanded, recursive=True) if os.path.isfile(p))
        if not matches:
            raise FileNotFoundError(f"{key}: {pattern!r} matches no file (expanded to {expanded!r}); "
                                    f"check the path or glob")
        files.extend(matches)
    return files


def file_format(files: list[str], key: str) -> str:
    kinds = {FORMATS.get(Path(f).suffix.lower(), "text") for f in files}
    if len(kinds) > 1:
        raise ValueError(f"{key}: mixes file formats {sorted(kinds)}; use one of text, jsonl or parquet "
                         f"per list")
    return kinds.pop()


def _not_utf8_at(path: str) -> int | None:
    """The byte offset near which ``path`` stops being UTF-8 text, or None if all of it decodes."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as exc:
                return max(0, offset + exc.start)
            offset += len(chunk)
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return offset
    return None


def check_utf8(files: list[str], key: str) -> None:
    """ValueError naming the first of ``files`` (text, jsonl, csv) that is not UTF-8 text."""
    for path in files:
        if FORMATS.get(Path(path).suffix.lower()) == "parquet":
            continue
        at = _not_utf8_at(path)
        if at is not None:
            raise ValueError(f"{key}: {path} is not UTF-8 text (undecodable near byte {at}): convert it "
                             f"(iconv -t utf-8) or remove it from {key}")


@contextlib.contextmanager
def datasets_progress(shown: bool):
    """``datasets``' progress bars (tokenize, pack) shown only if ``shown`` (and not turned off by the user);
    the previous setting comes back afterwards."""
    import datasets

    enabled = datasets.is_progress_bar_enabled()
    if not shown:
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        if enabled and not shown:
            datasets.enable_progress_bars()


def _load_dataset(kind: str, files: list[str], key: str, cache_dir: str | None, **extra):
    """``datasets.load_dataset`` of local files; a file that is not UTF-8 text is named (datasets only says
    that generation failed). Checked only on failure: a full read of every file on every start costs."""
    import datasets

    with datasets_progress(False):  # "Downloading data" (of local files) and "Generating train split"
        try:
            return datasets.load_dataset(kind, data_files=files, split="train", cache_dir=cache_dir, **extra)
        except Exception:
            check_utf8(files, key)
            raise


def check_jsonl(files: list[str], key: str) -> None:
    """Every non-empty line of every ``.jsonl`` file is one JSON object; the first bad line is named (file and
    line number) instead of the ``datasets`` loader's generic parse error."""
    jsonl = [path for path in files if Path(path).suffix.lower() == ".jsonl"]
    try:
        _check_jsonl_records(jsonl, key)
    except UnicodeDecodeError:
        check_utf8(jsonl, key)
        raise


def _check_jsonl_records(files: list[str], key: str) -> None:
    for path in files:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{key}: {path}, line {number}: not valid JSON ({exc.msg} at column "
                                     f"{exc.colno}); fix or remove that line") from None
                if not isinstance(record, dict):
                    raise ValueError(f"{key}: {path}, line {number}: expected a JSON object per line, got "
                                     f"{type(record).__name__}")


def load_texts(files: list[str], key: str, text_field: str, cache_dir: str | None):
    """A ``datasets.Dataset`` with one column ``text``: one row per text file, or per jsonl/parquet record."""
    kind = file_format(files, key)
    check_jsonl(files, key)
    extra = {"sample_by": "document"} if kind == "text" else {}
    ds = _load_dataset(kind, files, key, cache_dir, **extra)
    if kind != "text":
        if text_field not in ds.column_names:
            raise ValueError(f"{key}: the files have no column {text_field!r} (columns: {ds.column_names}); "
                             f"set data.text_field to the column holding the text")
        ds = ds.select_columns([text_field]).rename_column(text_field, "text") if text_field != "text" \
            else ds.select_columns(["text"])
    return ds


def tokenize_and_pack(texts: Dataset, tokenizer: PreTrainedTokenizerBase, seq_len: int, key: str):
    """Tokenize (EOS after every document), concatenate and cut into ``seq_len`` blocks (remainder of
    each map batch dropped, as in the transformers examples). Both maps are cached by ``datasets``."""
    eos = tokenizer.eos_token_id

    def tokenize(batch):
        ids = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
        return {"input_ids": [doc + [eos] for doc in ids]}

    def pack(batch):
        flat = list(chain.from_iterable(batch["input_ids"]))
        usable = len(flat) // seq_len * seq_len
        return {"input_ids": [flat[i:i + seq_len] for i in range(0, usable, seq_len)]}

    tokens = texts.map(tokenize, batched=True, remove_columns=texts.column_names, desc=f"tokenize {key}")
    blocks = tokens.map(pack, batched=True, batch_size=1000, desc=f"pack {key} into {seq_len}-token blocks")
    if len(blocks) == 0:
        total = sum(len(x) for x in tokens["input_ids"])
        raise ValueError(f"{key}: the files hold {total} tokens, fewer than one block of data.seq_len="
                         f"{seq_len}; add data or lower data.seq_len")
    return blocks.with_format("torch")


def load_pairs(files: list[str], key: str, source_field: str, target_field: str, cache_dir: str | None):
    """A ``datasets.Dataset`` with columns ``source`` and ``target`` from jsonl / csv / parquet records."""
    kind = file_format(files, key)
    if kind == "text":
        raise ValueError(f"{key}: encoder-decoder runs read records (jsonl, csv or parquet) with the columns "
                         f"data.source_field={source_field!r} and data.target_field={target_field!r}; "
                         f"got plain text files")
    check_jsonl(files, key)
    ds = _load_dataset(kind, files, key, cache_dir)
    for field_key, name in (("data.source_field", source_field), ("data.target_field", target_field)):
        if name not in ds.column_names:
            raise ValueError(f"{key}: the files have no column {name!r} (columns: {ds.column_names}); set "
                             f"{field_key} to the column holding that text")
    return ds.map(lambda b: {"source": b[source_field], "target": b[target_field]}, batched=True,
                  remove_columns=ds.column_names, desc=f"read {key}")


def tokenize_pairs(pairs: Dataset, tokenizer: PreTrainedTokenizerBase, max_source_len: int, max_target_len: int,
                   key: str):
    """Source -> ``input_ids``, target -> ``labels`` (each truncated, then EOS), texts kept for BLEU."""
    eos = tokenizer.eos_token_id
    if eos is None or tokenizer.pad_token_id is None:
        raise ValueError(f"{key}: the tokenizer needs an EOS and a padding token for encoder-decoder training")

    def tokenize(batch):
        source = tokenizer(batch["source"], add_special_tokens=False)["input_ids"]
        target = tokenizer(text_target=batch["target"], add_special_tokens=False)["input_ids"]
        return {"input_ids": [s[:max_source_len - 1] + [eos] for s in source],
                "labels": [t[:max_target_len - 1] + [eos] for t in target]}

    examples = pairs.map(tokenize, batched=True, desc=f"tokenize {key}")
    if len(examples) == 0:
        raise ValueError(f"{key}: no records")
    return examples


def pad_pairs(rows: dict[str, list], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad a micro-batch to its longest source and target: attention mask 0 and labels -100 at padding."""
    sources, targets = rows["input_ids"], rows["labels"]
    input_ids = torch.full((len(sources), max(map(len, sources))), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    labels = torch.full((len(targets), max(map(len, targets))), -100, dtype=torch.long)
    for i, (source, target) in enumerate(zip(sources, targets)):
        input_ids[i, :len(source)] = torch.tensor(source)
        attention_mask[i, :len(source)] = 1
        labels[i, :len(target)] = torch.tensor(target)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


@dataclass(frozen=True)
class BatchPlan:
    """Where each micro-batch of each step comes from in the global sample order."""

    micro_batch_size: int
    grad_accum: int
    dp_size: int

    @property
    def global_batch(self) -> int:
        return self.micro_batch_size * self.grad_accum * self.dp_size

    def positions(self, step: int, micro_index: int, dp_rank: int) -> range:
        start = step * self.global_batch + (micro_index * self.dp_size + dp_rank) * self.micro_batch_size
        return range(start, start + self.micro_batch_size)


class GlobalOrder:
    """Global sample index -> block index: a fresh seeded permutation of all blocks every epoch."""

    def __init__(self, num_blocks: int, seed: int):
        self.num_blocks = num_blocks
        self.seed = seed
        self._epoch = -1
        self._perm = torch.empty(0, dtype=torch.long)

    def __getitem__(self, position: int) -> int:
        epoch, offset = divmod(position, self.num_blocks)
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = torch.randperm(self.num_blocks, generator=gen)
            self._epoch = epoch
        return int(self._perm[offset])


class TrainBatches:
    """Micro-batches for one data-parallel rank: ``batch(step, micro_index)`` -> {input_ids, labels} (packed
    blocks; with ``document_eos`` also the position_ids of the documents in them, restarting after that token),
    or with ``pad_id`` the padded {input_ids, attention_mask, labels} of source/target pairs."""

    def __init__(self, blocks: Dataset, plan: BatchPlan, dp_rank: int, seed: int, pad_id: int | None = None,
                 sample_offset: int = 0, document_eos: int | None = None):
        self.blocks = blocks
        self.sample_offset = sample_offset  # samples seen before step 0 of this plan (a resumed run)
        self.plan = plan
        self.dp_rank = dp_rank
        self.order = GlobalOrder(len(blocks), seed)
        self.pad_id = pad_id
        self.document_eos = document_eos

    def ids(self, step: int, micro_index: int) -> list[int]:
        """The blocks (indices into the packed training set) of this rank's micro-batch."""
        return [self.order[self.sample_offset + p] for p in self.plan.positions(step, micro_index, self.dp_rank)]

    def batch(self, step: int, micro_index: int) -> dict[str, torch.Tensor]:
        idx = self.ids(step, micro_index)
        if self.pad_id is not None:
            return pad_pairs(self.blocks.select(idx)[:], self.pad_id)
        return block_batch(self.blocks[idx]["input_ids"], self.document_eos)


def block_batch(input_ids: torch.Tensor, document_eos: int | None) -> dict[str, torch.Tensor]:
    """A micro-batch of packed blocks: {input_ids, labels} and, with ``document_eos``, the documents' position_ids."""
    batch = {"input_ids": input_ids, "labels": input_ids.clone()}
    if document_eos is not None:
        batch["position_ids"] = document_positions(input_ids, document_eos)
    return batch


def check_enough_for_one_step(blocks: Dataset, plan: BatchPlan, key: str) -> None:
    if len(blocks) < plan.global_batch:
        raise ValueError(f"{key}: {len(blocks)} training examples, fewer than one global batch of "
                         f"{plan.global_batch} (train.micro_batch_size={plan.micro_batch_size} x train.grad_accum="
                         f"{plan.grad_accum} x {plan.dp_size} data-parallel ranks); add data or lower those")


def check_token_ids(blocks: Dataset, vocabulary: int, key: str, model: str) -> None:
    """Every token id must index the model's embedding; an id outside it would fail deep inside the forward."""
    for column in ("input_ids", "labels"):
        if column not in blocks.column_names:
            continue
        worst = -1
        for batch in blocks.with_format(None).iter(batch_size=4096):
            worst = max([worst, *(max(ids) for ids in batch[column] if len(ids))])
        if worst >= vocabulary:
            raise ValueError(f"{key}: token id {worst} is outside the vocabulary of {model} ({vocabulary} "
                             f"embeddings): the tokenizer does not match the model; use the model's own tokenizer "
                             f"(model.tokenizer) or, from scratch, a model.config.vocab_size above {worst}")


def eval_rounds(num_examples: int, micro_batch_size: int, dp_rank: int, dp_size: int, limit: int | None):
    """This rank's example positions per eval round, and which of them are real. The examples scored are the
    first ``limit`` x ``micro_batch_size`` (all when ``limit`` is None) whatever the data-parallel size, so a
    run scores the same examples at every layout. Every rank runs the same number of rounds (ZeRO-3 forwards
    are collective); positions past the scored ones repeat example 0 and are flagged not real."""
    scored = num_examples if limit is None else min(num_examples, limit * micro_batch_size)
    per_round = micro_batch_size * dp_size
    for r in range(-(-scored // per_round)):
        start = r * per_round + dp_rank * micro_batch_size
        positions = range(start, start + micro_batch_size)
        yield [p if p < scored else 0 for p in positions], [p < scored for p in positions]


def eval_batches(blocks: Dataset, micro_batch_size: int, dp_rank: int, dp_size: int, limit: int | None,
                 document_eos: int | None = None):
    """Deterministic eval micro-batches for one rank, in file order (see ``eval_rounds``); padding rows carry
    ``weight`` 0."""
    for positions, real in eval_rounds(len(blocks), micro_batch_size, dp_rank, dp_size, limit):
        yield block_batch(blocks[positions]["input_ids"], document_eos), torch.tensor(real, dtype=torch.float32)
