"""Export a colonnade checkpoint to a Hugging Face directory, whatever layout wrote it:

    python -m training.checkpoint.export runs/quickstart/checkpoints/step_0000300 my_model/
    python -m training.checkpoint.export runs/quickstart my_model/          # the run's newest complete checkpoint

The checkpoint is verified against its manifest first; the result loads with ``from_pretrained``. Each full
tensor is assembled from the ranks' pieces and written before the next (files of at most ``--max-shard-size``),
so memory holds about one tensor, never the model. OUT must be
new, empty, or an earlier export of ours (marked by ``colonnade_export.json``), which is replaced; anything
else (a user's files, a run, the checkpoint itself) is refused with exit code 2 and left untouched.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from training.checkpoint import files, hf_files
from training.checkpoint.pieces import CheckpointReader


def find_checkpoint(path: Path) -> Path:
    """A checkpoint directory, or the newest complete one under a run directory / checkpoints root."""
    if files.step_of(path) is not None:
        return path
    for root in (path, path / "checkpoints"):
        found = files.newest_complete(root)
        if found is not None:
            return found
    raise files.CheckpointError(f"{path}: neither a checkpoint (step_* with {files.MANIFEST}) nor a run directory "
                                f"holding a complete one")


def export(checkpoint_dir: Path, out_dir: Path, trust_remote_code: bool = False,
           max_shard_size: int | str = hf_files.DEFAULT_MAX_SHARD_SIZE) -> Path:
    """``out_dir`` must be new, empty, or an earlier export of ours (``files.write_export``): it is
    checked before anything is loaded, and nothing else is ever deleted. Tensors are written one at a time into
    safetensors files of at most ``max_shard_size`` (plus an index when there are several)."""

    def write(tmp: Path) -> None:
        from transformers import AutoConfig, AutoTokenizer

        files.verify(checkpoint_dir)
        config = AutoConfig.from_pretrained(str(checkpoint_dir), trust_remote_code=trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(str(checkpoint_dir), trust_remote_code=trust_remote_code)
        reader = CheckpointReader(checkpoint_dir)
        specs = {name: (shape, reader.dtype(f"model/{name}")) for name, shape in reader.names("model").items()}
        hf_files.write_weights(tmp, hf_files.shard_plan(specs, max_shard_size), lambda n: reader.full(f"model/{n}"))
        hf_files.write_config_files(tmp, config, tokenizer)

    return files.write_export(out_dir, write, source=checkpoint_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Export a colonnade checkpoint to a Hugging Face directory.")
    parser.add_argument("checkpoint", type=Path, help="a step_* checkpoint directory, or a run's output_dir")
    parser.add_argument("out", type=Path, help="directory to write: must be new, empty, or an earlier export of "
                        "ours (which is replaced); anything else is refused and left as it is")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow code inside the checkpoint to run")
    parser.add_argument("--max-shard-size", default=hf_files.DEFAULT_MAX_SHARD_SIZE,
                        help="largest weights file, e.g. 5GB or 500MB (default %(default)s); bigger models get "
                        "model-0000k-of-0000n.safetensors and an index, as save_pretrained writes")
    args = parser.parse_args(argv)
    try:
        source = find_checkpoint(args.checkpoint)
        out = export(source, args.out, args.trust_remote_code, args.max_shard_size)
    except (files.CheckpointError, OSError) as exc:
        print(f"colonnade export: error: {exc}", file=sys.stderr)
        return 2
    print(f"exported {source} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
