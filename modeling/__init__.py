"""Hugging Face models for colonnade: build/load, and (later) TP plans and pipeline stage splits."""

from modeling.build import build_model, byte_level_tokenizer, load_tokenizer, train_bpe_tokenizer

__all__ = ["build_model", "byte_level_tokenizer", "load_tokenizer", "train_bpe_tokenizer"]
