"""Hugging Face causal LMs and their tokenizers, from a local checkpoint or from scratch.

Receives the model slice of the config as plain values (no training config objects), so it can be used
by the trainer, the benchmarks and the tests alike.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from modeling import config_check
from modeling.materialize import SeededInit, StoredWeights, empty_model, materialize

SPECIAL_TOKENS = {"bos_token": "<|bos|>", "eos_token": "<|endoftext|>", "pad_token": "<|pad|>",
                  "unk_token": "<|unk|>"}


def check_checkpoint_dir(path: str | Path) -> Path:
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"model.pretrained={path}: no config.json there; point it at a directory "
                                f"written by save_pretrained (hub downloads are not used)")
    return path


def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """A 256-symbol byte-level BPE with no merges: every UTF-8 byte is one token. Needs no training."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = ByteLevel.alphabet()
    vocab = {symbol: i for i, symbol in enumerate(sorted(alphabet))}
    for token in SPECIAL_TOKENS.values():
        vocab[token] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIAL_TOKENS.values()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL_TOKENS)


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE (GPT-2 style) trained with ``tokenizers`` on ``texts``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS.values()),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL_TOKENS)


def load_tokenizer(path: str | Path, trust_remote_code: bool = False):
    tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer at {path} has no eos_token; packing needs one between documents")
    return tokenizer


def hf_config(*, pretrained: str | None, arch: str | None, config: dict, trust_remote_code: bool = False):
    """The HF config a run will build, without building the model (for validation: ``model.config``'s keys are
    checked against the config class of ``arch``)."""
    if arch is not None:
        config_check.check_keys(arch, config)
    return model_config(pretrained=pretrained, arch=arch, config=config, vocab_size=None,
                        trust_remote_code=trust_remote_code)


def auto_class(config: PretrainedConfig):
    """The HF auto class of a config: sequence-to-sequence LM for encoder-decoder models, else causal LM."""
    return AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM


def model_config(*, pretrained: str | None, arch: str | None, config: dict, vocab_size: int | None,
                 trust_remote_code: bool = False):
    """The HF config of the model a run builds: the checkpoint's, or ``arch`` with ``config`` and at least
    ``vocab_size`` embeddings (the tokenizer's)."""
    if pretrained is not None:
        return AutoConfig.from_pretrained(str(check_checkpoint_dir(pretrained)), trust_remote_code=trust_remote_code)
    if arch is None:
        raise ValueError("model: set model.pretrained (a checkpoint) or model.arch (a model type)")
    fields = dict(config)
    if vocab_size is not None:
        fields.setdefault("vocab_size", vocab_size)
    hf = config_check.build_config(arch, fields)
    config_check.check_values(hf)
    if vocab_size is not None and hf.vocab_size < vocab_size:
        raise ValueError(f"model.config.vocab_size={hf.vocab_size} is smaller than the tokenizer's "
                         f"{vocab_size} tokens; remove it to use the tokenizer's size")
    return hf


def weights_source(pretrained: str | None, seed: int):
    """Where the starting weights come from: the checkpoint directory, or the seeded initialisation."""
    if pretrained is None:
        return SeededInit(seed)
    return StoredWeights(check_checkpoint_dir(pretrained), "model.pretrained")


def build_model(*, pretrained: str | None, arch: str | None, config: dict, vocab_size: int | None,
                seed: int, trust_remote_code: bool = False, dtype: torch.dtype = torch.float32):
    """A full (unsharded) HF causal or sequence-to-sequence LM, loaded from ``pretrained`` or initialised from
    ``seed``: the weights every layout starts from (``modeling.materialize``)."""
    hf = model_config(pretrained=pretrained, arch=arch, config=config, vocab_size=vocab_size,
                      trust_remote_code=trust_remote_code)
    full = empty_model(auto_class(hf), hf, trust_remote_code, dtype)
    model = copy.deepcopy(full)
    materialize(full, model, model, weights_source(pretrained, seed), None)
    return model


def check_sequence_fits(hf_config: PretrainedConfig, seq_len: int, target_len: int | None = None) -> None:
    """Raise ValueError when a sequence is longer than the model's learned or tabulated positions (GPT-2's
    ``n_positions``, BART's and Marian's ``max_position_embeddings``): the first forward would index past the
    position table. Rotary models (``rope_parameters``) and relative ones (T5) have no such table."""
    limit = getattr(hf_config, "max_position_embeddings", None)
    if limit is None or getattr(hf_config, "rope_parameters", None) is not None:
        return
    lengths = {"data.seq_len": seq_len, "data.max_target_len": target_len}
    for key, length in lengths.items():
        if length is not None and length > limit:
            raise ValueError(f"{key}={length} is longer than the {limit} positions of this {hf_config.model_type} "
                             f"model (max_position_embeddings): lower {key} to at most {limit}")


def meta_model(hf_config: PretrainedConfig, trust_remote_code: bool = False) -> PreTrainedModel:
    """The model ``hf_config`` describes, on the meta device (its structure; no storage, no initialisation)."""
    with torch.device("meta"):
        return auto_class(hf_config).from_config(hf_config, trust_remote_code=trust_remote_code)


def parameter_count(hf_config: PretrainedConfig, trust_remote_code: bool = False) -> int:
    """Parameters of the model ``hf_config`` describes (each tied weight once), built on the meta device."""
    return sum(p.numel() for p in meta_model(hf_config, trust_remote_code).parameters())


def hidden_size(hf_config: Any) -> int | None:
    """The hidden size HF Trainer sizes ZeRO's buckets by (transformers/integrations/deepspeed.py): the config's
    ``hidden_size``, else the largest of ``hidden_sizes``, else the same of its ``text_config``."""
    sources: list[Any] = [hf_config, getattr(hf_config, "text_config", None)]
    for source in sources:
        if getattr(source, "hidden_size", None):
            return int(source.hidden_size)
        if getattr(source, "hidden_sizes", None):
            return int(max(source.hidden_sizes))
    return None


def describe(hf_config: PretrainedConfig, parameters: int, vocabulary: int | str) -> str:
    """One line for the console: type, depth, width, parameters, vocabulary."""
    layers = getattr(hf_config, "num_hidden_layers", None)
    hidden = getattr(hf_config, "hidden_size", None)
    return (f"{hf_config.model_type}, {layers} layers, hidden size {hidden}, {parameters:,} parameters "
            f"({parameters / 1e6:.1f} M), vocabulary {vocabulary}")
