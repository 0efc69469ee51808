"""Hugging Face models for colonnade: build and load them, their TP plans (tp_plans), the tensor-parallel
sharding (parallelize), the pipeline stage split (pipeline), meta-device materialization and recomputation."""

from modeling.build import build_model, byte_level_tokenizer, load_tokenizer, train_bpe_tokenizer

__all__ = ["build_model", "byte_level_tokenizer", "load_tokenizer", "train_bpe_tokenizer"]
