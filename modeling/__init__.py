"""Hugging Face models for colonnade: build and load them (build, materialize, checkpoint_conversion), their TP
plans (tp_plans) applied to the HF modules (tensor_parallel), the shard contract (shards), losses and generation
on vocabulary-parallel logits (losses, generation), the pipeline chunks (pipeline) and stage partition
(pipeline_partition), activation recomputation (recompute)."""

from modeling.build import build_model, byte_level_tokenizer, load_tokenizer, train_bpe_tokenizer

__all__ = ["build_model", "byte_level_tokenizer", "load_tokenizer", "train_bpe_tokenizer"]
