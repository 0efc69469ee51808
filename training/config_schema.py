"""The sections of the run configuration (``model``, ``data``, ``train``, ``optim``, ``eval``, ``parallel``,
``logging``): each key's type, default, bounds and meaning (``docs/config.md`` is generated from them). The whole
run, its cross-section checks and the loading are in ``training.config``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

PARTITION_METHODS = ("uniform", "parameters", "measured")


class Section(BaseModel):
    """A YAML section: unknown keys are errors; a loaded config is frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(Section):
    pretrained: str | None = Field(default=None, description="Local Hugging Face checkpoint directory to fine-tune.")
    arch: str | None = Field(default=None, description="HF model_type for a from-scratch run, e.g. gpt2 or llama.")
    config: dict[str, Any] = Field(default_factory=dict,
                                   description="HF config fields for a from-scratch run (n_layer, ...).")
    tokenizer: str | None = Field(default=None, description="'byte', 'bpe' (trained on data.train_files) or a "
                                  "tokenizer directory; default: the checkpoint's own, else 'byte'.")
    bpe_vocab_size: int = Field(default=8192, ge=260, description="Vocabulary size when tokenizer is 'bpe'.")
    trust_remote_code: bool = Field(default=False, description="Allow code shipped inside the checkpoint to run.")

    @model_validator(mode="after")
    def _one_source(self):
        if (self.pretrained is None) == (self.arch is None):
            raise ValueError("set exactly one of model.pretrained (a local HF checkpoint dir) or "
                             "model.arch (+ model.config) for a from-scratch run")
        if self.pretrained is not None and self.config:
            raise ValueError("model.config applies to from-scratch runs only; the checkpoint's "
                             "config.json describes a pretrained model")
        return self


class DataConfig(Section):
    train_files: list[str] = Field(min_length=1, description="Text/jsonl/parquet files or globs; "
                                   "'{stdlib}' expands to the Python standard library directory.")
    valid_files: list[str] = Field(default_factory=list, description="Held-out files for eval.")
    seq_len: int = Field(gt=1, description="Tokens per packed training block (decoder-only models); the "
                         "longest source, in tokens, for encoder-decoder models (longer ones are truncated).")
    text_field: str = Field(default="text", description="Column holding the text in jsonl/parquet files.")
    separate_documents: bool = Field(default=False, description="Decoder-only: the documents packed into a block "
                                     "(each ends with EOS) stay apart: position ids restart after every EOS and "
                                     "attention does not cross a document boundary (Megatron's --reset-position-ids "
                                     "--reset-attention-mask; transformers' packed position ids). Every token keeps "
                                     "its next-token target. Not with pipelines.")
    source_field: str | None = Field(default=None, description="Encoder-decoder models: column of the source text "
                                     "(jsonl/csv/parquet); setting it makes the run sequence-to-sequence.")
    target_field: str | None = Field(default=None, description="Encoder-decoder models: column of the target text.")
    max_target_len: int = Field(default=128, gt=1, description="Longest target, in tokens (longer are truncated).")
    cache_dir: str | None = Field(default=None, description="datasets cache; default ~/.cache/huggingface.")

    @field_validator("train_files", "valid_files", mode="before")
    @classmethod
    def _one_file_is_a_list(cls, value):
        return [value] if isinstance(value, str) else value


class TrainConfig(Section):
    steps: int = Field(gt=0, description="Optimizer steps to run.")
    micro_batch_size: int = Field(default=1, gt=0, description="Sequences per micro-batch per data-parallel rank.")
    grad_accum: int = Field(default=1, gt=0, description="Micro-batches accumulated per optimizer step.")
    global_batch_size: int | None = Field(default=None, gt=0, description="Sequences per optimizer step over all "
                                          "data-parallel ranks. When set, grad_accum is derived at launch as "
                                          "global_batch_size / (micro_batch_size x data-parallel size), so the "
                                          "batch stays the same when an elastic restart changes the number of "
                                          "nodes; None = micro_batch_size x grad_accum x data-parallel size.")
    seed: int = Field(default=1234, description="Seeds weights (from scratch), dropout and the data order.")
    output_dir: str = Field(default="runs/default",
                            description="Metrics, checkpoints and the HF export. A new or empty "
                            "directory, or one an earlier start of a colonnade run wrote (it holds "
                            "colonnade_run.json); any other directory is refused.")
    overwrite: bool = Field(default=False, description="Start again from step 0 in output_dir although it holds a run: "
                            "that run's checkpoints, metrics and run files are moved into output_dir/earlier/N "
                            "first (nothing is deleted). Without it such a run is continued only by train.resume.")
    log_every: int = Field(default=1, gt=0, description="Steps between metric records.")
    eval_every: int = Field(default=0, ge=0, description="Steps between evals; 0 = only at the end.")
    eval_batches: int | None = Field(default=None, gt=0,
                                     description="Validation micro-batches scored per eval, counted "
                                     "over all data-parallel ranks together: the first eval_batches x "
                                     "micro_batch_size examples, the same at every layout; None = all.")
    eval_first: bool = Field(default=False, description="Also evaluate before the first step (logged as step 0).")
    save_every: int = Field(default=0, ge=0, description="Steps between checkpoints; 0 = only at the end.")
    save_final: bool = Field(default=True, description="Write a checkpoint at the end (benchmarks turn it off).")
    async_save: bool = Field(default=False, description="Checkpoints are copied to host memory at the step boundary "
                             "and written by a background thread while training goes on (one save in flight; "
                             "the next save, the end of the run or a stop signal waits for it). Costs host "
                             "memory for one copy of this rank's checkpoint share.")
    resume: str | None = Field(default=None, description="'auto' (latest in output_dir) or a checkpoint dir.")
    export_hf: bool = Field(default=True, description="Write output_dir/hf (save_pretrained) at the end.")
    export_max_shard_size: str = Field(default="2GB", pattern=r"^\s*[0-9]+(\.[0-9]+)?\s*([KMGT]B|[kmgt]b)\s*$",
                                       description="Largest weights file of the HF export (KB, MB, GB, TB): bigger "
                                       "models get model-0000k-of-0000n.safetensors + index, as save_pretrained "
                                       "writes; rank 0 holds one such file at a time.")
    progress: bool = Field(default=True, description="Progress bar on rank 0.")
    log_sample_ids: bool = Field(default=False, description="Each data-parallel rank's input reader appends the ids "
                                 "(indices into the packed training set) of the sequences of every step to "
                                 "output_dir/samples/rank-NNNNN.jsonl, with the elastic restart attempt: an audit "
                                 "that restarts skip and repeat no sample.")
    compile: bool = Field(default=False, description="Compile each transformer block's training forward with "
                          "torch.compile (training.compile; per block, as TorchTitan and Megatron do), composed with "
                          "tensor, sequence and pipeline parallelism, ZeRO 0-2 and recomputation; ZeRO-3, context > 1 "
                          "and expert > 1 are refused. The first steps pay the compilation; lean_activations steps "
                          "aside (inductor chooses what to keep). Off by default: 1.25x eager's tokens/s on the "
                          "CPU quickstart after a 19 s first compilation (python -m bench compile).")
    max_consecutive_skips: int = Field(default=10, gt=0, description="Steps with a non-finite loss or gradient are "
                                       "skipped on every rank (logged, counted in skipped_steps); this many in a "
                                       "row stop the run.")


    @field_validator("output_dir")
    @classmethod
    def _a_directory_name(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("the run needs a directory of its own; name one, e.g. runs/my-run")
        return value

    @model_validator(mode="after")
    def _one_way_to_start(self):
        if self.overwrite and self.resume is not None:
            raise ValueError(f"train.overwrite=true starts again from step 0 and train.resume={self.resume} "
                             f"continues a checkpoint: set one of them")
        return self

    @property
    def derives_grad_accum(self) -> bool:
        """grad_accum comes from global_batch_size at launch (``for_world``)."""
        return self.global_batch_size is not None


class OptimConfig(Section):
    lr: float = Field(default=3e-4, gt=0, description="Peak learning rate (AdamW).")
    weight_decay: float = Field(default=0.0, ge=0, description="AdamW decoupled weight decay.")
    betas: tuple[float, float] = Field(default=(0.9, 0.95), description="AdamW betas.")
    eps: float = Field(default=1e-8, gt=0, description="AdamW epsilon.")
    warmup_steps: int = Field(default=0, ge=0, description="Linear warm-up steps, then cosine decay.")
    min_lr_ratio: float = Field(default=0.1, ge=0, le=1, description="Cosine floor as a fraction of lr.")
    grad_clip: float = Field(default=1.0, ge=0, description="Global gradient-norm clip; 0 disables.")
    fused: bool = Field(default=True,
                        description="torch's fused AdamW kernel (HF Trainer's default, adamw_torch_fused): "
                        "the update without the foreach implementation's full-size temporaries, two fewer copies of "
                        "the optimizer partition at the step (bench/results/memory-cpu-steps). false: foreach.")


class EvalConfig(Section):
    bleu: bool = Field(default=True, description="Encoder-decoder runs: generate for the validation sources and score "
                       "sacreBLEU against the targets at every eval.")
    num_beams: int = Field(default=1, ge=1, description="1 = greedy decoding; more = beam search.")
    max_new_tokens: int = Field(default=64, gt=0, description="Longest generated target.")
    bleu_samples: int | None = Field(default=None, gt=0, description="Validation examples to translate; None = all.")


class ParallelConfig(Section):
    tensor: int = Field(default=1, ge=1, description="Tensor-parallel degree.")
    pipeline: int = Field(default=1, ge=1, description="Pipeline-parallel degree (stages).")
    expert: int = Field(default=1, ge=1, description="Expert-parallel degree: the routed experts of each "
                        "mixture-of-experts layer are split over groups of this many data-parallel ranks, tokens "
                        "reach their experts' rank by all-to-all (dropless: every token computed, as on one process). "
                        "Must divide the data-parallel degree and each layer's expert count; ZeRO 1 or 2.")
    zero_stage: Literal[0, 1, 2, 3] = Field(default=0, description="DeepSpeed ZeRO stage over the data-parallel group.")
    overlap_comm: bool | None = Field(default=None, description="Reduce gradient buckets while the backward still runs "
                                      "(DeepSpeed's zero_optimization.overlap_comm). None: on for ZeRO-2/3, off for "
                                      "ZeRO-1 (2% slower with it on the 2-core CPU box, bench/results/overlap-cpu). "
                                      "Not with pipelines at ZeRO-1 (DeepSpeed refuses it). A user DeepSpeed JSON's "
                                      "own value wins.")
    bucket_size: int | None = Field(default=None, gt=0, description="Gradient elements per ZeRO bucket (DeepSpeed's "
                                    "zero_optimization.reduce_bucket_size and allgather_bucket_size). None: the "
                                    "model's hidden_size squared, HF Trainer's \"auto\" (and under ZeRO-3 "
                                    "stage3_prefetch_bucket_size 0.9 x hidden_size squared, "
                                    "stage3_param_persistence_threshold 10 x hidden_size), instead of DeepSpeed's "
                                    "500 M, which holds 2 GB per fp32 buffer whatever the model. ZeRO 1/2 stage "
                                    "gradients in a buffer of this size (two with overlap_comm). A user DeepSpeed "
                                    "JSON's own value wins; its \"auto\" means this default.")
    zero3_live_parameters: int | None = Field(default=None, gt=0,
                                              description="ZeRO-3: parameters kept gathered at once "
                                              "(DeepSpeed's stage3_max_live_parameters, where prefetching stops) "
                                              "and the distance in parameters under which a gathered one waits for "
                                              "its next use (stage3_max_reuse_distance). None: DeepSpeed's 1e9 each, "
                                              "which keeps every parameter of a smaller model gathered from its "
                                              "forward to its backward. Lower: less memory, less prefetch overlap "
                                              "(bench/results/memory-cpu). A user DeepSpeed JSON's own value wins.")
    offload: Literal["none", "optimizer", "optimizer+params"] = Field(
        default="none", description="ZeRO offload to host memory (DeepSpeed's zero_optimization.offload_optimizer / "
        "offload_param): 'optimizer' keeps the fp32 master weights and AdamW moments on the CPU and steps them "
        "there (ZeRO 1-3); 'optimizer+params' also keeps the parameters there between uses (ZeRO-3). The "
        "optimizer is colonnade's torch AdamW on CPU tensors. A user DeepSpeed JSON's own offload sections win.")
    activation_checkpointing: Literal["none", "full", "selective"] = Field(
        default="none", description="Recompute activations in the backward (Megatron's modes): 'full' keeps only each "
        "transformer block's input and runs the block again; 'selective' recomputes only the core attention "
        "(scores, softmax, dropout, weighted sum). The recomputed dropout masks are the forward's.")
    schedule: Literal["gpipe", "1f1b", "interleaved", "zb-h1"] = Field(
        default="1f1b", description="Pipeline schedule; zb-h1 splits the backward so that weight gradients fill 1F1B's "
                            "bubble (ZeRO-1/2).")
    virtual_stages: int = Field(default=1, ge=1, description="Model chunks per pipeline rank (interleaved schedule).")
    partition: str = Field(default="uniform", description="'uniform', 'parameters' (balanced by parameter count), "
                           "'measured' (balanced by each item's forward + backward time, probed before the run; "
                           "the chosen partition is printed and saved in output_dir/pipeline_partition.json) or a "
                           "partition string such as 'E,t,t|t,t,L' (E embedding, t block, L head + loss).")
    @field_validator("partition")
    @classmethod
    def _partition_method_or_string(cls, value: str) -> str:
        if value not in PARTITION_METHODS and not set(value) <= set("Et,L| "):
            raise ValueError(f"expected one of {', '.join(PARTITION_METHODS)} or a partition string of E, t and L "
                             f"such as 'E,t,t|t,t,L' (stages separated by |)")
        return value

    p2p_timeout_s: float = Field(default=600.0, gt=0, description="A pipeline receive waiting longer fails the job.")
    timeout_s: float = Field(default=1800.0, gt=0,
                             description="A collective (all-reduce, gather, ...) not complete after "
                             "this many seconds ends the job with an error naming the operation and the rank, "
                             "instead of hanging.")
    sequence_parallel: bool = Field(default=False, description="Megatron sequence parallelism (needs tensor > 1): "
                                    "norms and dropout work on a sequence shard; all-gather/reduce-scatter "
                                    "replace the all-reduces.")
    context: int = Field(default=1, ge=1, description="Context-parallel degree (modeling.context): each sequence is "
                         "split over this many data-parallel ranks, each holding 1/context of every sequence through "
                         "the whole model (load-balanced: chunks r and 2N-1-r of 2N); attention crosses the group "
                         "(context_attention); gradients are reduced over data x context, as Megatron's CP. Must "
                         "divide the data-parallel degree; data.seq_len divisible by 2 x context (x tensor with "
                         "sequence_parallel).")
    mlp_tiles: int = Field(default=1, ge=1, description="Compute each block's MLP over this many tiles of the "
                           "sequence with DeepSpeed's TiledMLP (training.tiling): the MLP keeps only its input for "
                           "the backward, which recomputes one tile at a time; for long sequences. 1: off. Dense "
                           "MLPs only (not mixture-of-experts blocks); not with sequence_parallel.")
    lean_activations: bool = Field(default=True, description="Keep for the backward only what Megatron's "
                                   "accounting keeps (modeling.lean): composite activations (tanh-GELU, the gated "
                                   "act(gate) x up), norms built of several operations and dropout masks are "
                                   "replaced by equal computations that save their inputs (and a 1-byte mask); "
                                   "chosen from the module types. Same numbers; false: transformers' modules as "
                                   "they are.")
    loss_chunk_tokens: int = Field(default=1024, ge=0, description="Compute the output layer and the cross "
                                   "entropy over chunks of this many tokens (modeling.losses), recomputing each "
                                   "chunk's logits in the backward: the full (tokens x vocabulary) fp32 logits are "
                                   "never held. Also under the vocabulary-parallel head and in evals. 0: full logits "
                                   "as transformers computes them.")
    context_attention: Literal["auto", "ulysses", "ring"] = Field(
        default="auto", description="context > 1: 'ulysses' (all-to-all over heads, then the model's own attention "
        "on the whole sequence; needs the heads per tensor rank divisible by context), 'ring' (key/value chunks "
        "pass round the group, any head count, no attention dropout), 'auto' Ulysses where the heads divide.")
    grad_compression: Literal["none", "bf16", "int8", "int4"] = Field(
        default="none", description="Data-parallel gradient averaging on the wire (parallel.compression): 'none' is "
        "DeepSpeed's full-precision all-reduce; 'bf16' sends bf16 and sums the received pieces in fp32; 'int8' / "
        "'int4' send block-wise scaled integers (one fp32 scale per 128 values). Model-parallel reductions stay "
        "exact. ZeRO 0-2 (not ZeRO-3, offload or expert parallelism); turns DeepSpeed's overlap_comm off.")
    error_feedback: bool = Field(default=True, description="With grad_compression: each rank adds what its last "
                                 "encodings lost to its next gradients (one fp32 residual of its gradients' size, "
                                 "saved in its checkpoint file). false: the loss is dropped.")
    sync_every: int = Field(default=1, ge=1, description="DiLoCo (training.outer_sync): each data-parallel rank "
                            "takes this many AdamW steps on its own, then the ranks average their parameter "
                            "deltas (through grad_compression's codec when set) and an outer Nesterov step applies "
                            "them. 1: every step's gradients are averaged (no outer loop). ZeRO-0; save_every and "
                            "eval_every must be multiples of it.")
    outer_lr: float = Field(default=1.0, gt=0, description="sync_every > 1: the outer Nesterov step's learning rate. "
                            "1.0 with outer_momentum 0: the replicas' mean (periodic averaging), what short intervals "
                            "need; DiLoCo's 0.7 with momentum 0.9 is for intervals of hundreds of steps (at "
                            "sync_every 8 it multiplies the step about 7-fold and the quickstart stalls).")
    outer_momentum: float = Field(default=0.0, ge=0, lt=1, description="sync_every > 1: the outer Nesterov "
                                  "momentum (DiLoCo's 0.9 for long intervals, see outer_lr).")
    tp_async_grad_reduce: bool = Field(default=True, description="Tensor parallelism: launch the input-gradient "
                                       "all-reduce (reduce-scatter with sequence_parallel) asynchronously and "
                                       "compute the weight gradients while it runs (Megatron's asynchronous "
                                       "all-reduce); false waits for it first. Same gradients either way.")


class WandbConfig(Section):
    mode: Literal["offline", "online", "disabled"] = Field(default="offline", description="offline needs no network.")
    project: str = "colonnade"
    name: str | None = None
    group: str | None = None


class LoggingConfig(Section):
    wandb: WandbConfig = Field(default_factory=WandbConfig)
