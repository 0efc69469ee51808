"""One-line descriptions of a run for the console and ``--print-config``: the model and the layout."""

from __future__ import annotations

from pathlib import Path

from modeling.build import byte_level_tokenizer, describe, hf_config, hidden_size, load_tokenizer, parameter_count
from training.config import RunConfig, data_parallel_size


def planned_model(cfg: RunConfig) -> str:
    """The model a run of ``cfg`` will build, without data or weights (meta device). From scratch, the
    vocabulary is the tokenizer's: a BPE's is known only after training it (at most ``bpe_vocab_size``)."""
    config = hf_config(pretrained=cfg.model.pretrained, arch=cfg.model.arch, config=cfg.model.config,
                       trust_remote_code=cfg.model.trust_remote_code)
    vocabulary: int | str = config.vocab_size
    source = f"pretrained {cfg.model.pretrained}" if cfg.model.pretrained else "from scratch"
    if cfg.model.arch and "vocab_size" not in cfg.model.config:
        choice = cfg.model.tokenizer or "byte"
        if choice == "bpe":
            config.vocab_size = cfg.model.bpe_vocab_size
            vocabulary = f"up to {cfg.model.bpe_vocab_size} (BPE trained on data.train_files)"
        else:
            if choice != "byte" and not Path(choice).is_dir():
                raise FileNotFoundError(f"model.tokenizer={choice}: not 'byte', 'bpe' or a tokenizer directory")
            tokenizer = byte_level_tokenizer() if choice == "byte" else load_tokenizer(Path(choice))
            config.vocab_size = vocabulary = len(tokenizer)
    return f"{describe(config, parameter_count(config, cfg.model.trust_remote_code), vocabulary)}; {source}"


def planned_hidden_size(cfg: RunConfig) -> int | None:
    """The hidden size of the model a run of ``cfg`` builds (what the model-sized ZeRO buckets follow)."""
    return hidden_size(hf_config(pretrained=cfg.model.pretrained, arch=cfg.model.arch, config=cfg.model.config,
                                 trust_remote_code=cfg.model.trust_remote_code))


def layout(cfg: RunConfig, world_size: int) -> str:
    data = data_parallel_size(cfg, world_size) // cfg.parallel.context
    context = f" x context {cfg.parallel.context}" if cfg.parallel.context > 1 else ""
    virtual = f", {cfg.parallel.virtual_stages} virtual stages" if cfg.parallel.virtual_stages > 1 else ""
    pipeline = f" ({cfg.parallel.schedule}{virtual})" if cfg.parallel.pipeline > 1 else ""
    return (f"world {world_size} = tensor {cfg.parallel.tensor} x pipeline {cfg.parallel.pipeline}{pipeline} x "
            f"data {data}{context}; ZeRO-{cfg.parallel.zero_stage}; {cfg.precision}")
