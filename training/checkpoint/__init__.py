"""Layout-agnostic training checkpoints, written by every rank in parallel, and the Hugging Face export.

Each rank writes what it alone holds, so no rank gathers the model and the save takes the time of one rank's
share; any (tensor, pipeline, data, ZeRO) layout resumes from it:

    step_0000010/
      rank-00000-of-00008.safetensors   per rank: for each tensor its pipeline stage owns, the flat range of its
        ...                              tensor-parallel shard that no data-parallel replica also writes (its ZeRO
                                         partition, else an even share), under 'model/<HF name>', 'exp_avg/<name>',
                                         'exp_avg_sq/<name>' and, in bf16/fp16, 'master/<name>' (fp32 masters);
                                         where each piece lies in the full tensor is in the file's metadata
                                         (``pieces.Piece``); and the rank's RNG states
      index.json                         every piece of every tensor (the metadata of all rank files)
      trainer_state.json                 step, samples consumed, AdamW step count, skipped steps, LR schedule,
                                         loss scaler, the layout that wrote it
      config.json, tokenizer files, run_config.yaml
      manifest.json                      size and SHA-256 of every file above, written last

Every rank streams its file into the staging directory and fsyncs it; once all have (the only wait), rank 0
writes the index and the rest and commits (``files``: manifest, rename). Loading verifies the
manifest, gives each rank's parameters their values from the saved pieces that overlap its shards
(``CheckpointWeights``, before the model exists in memory) and after DeepSpeed is set up the optimizer state
the same way (``restore``). Nothing is pickled. Checkpoints of format 1 (one gathered ``model.safetensors``
and ``optimizer.safetensors``) still load. ``python -m training.checkpoint.export`` turns any of them into an
HF directory.

The modules: ``resume`` (which checkpoint to resume from), ``saving`` and ``background`` (writing, in the step
loop or a thread), ``holdings`` (what a rank holds and writes), ``pieces`` (which piece of which tensor a file
holds; any layout's shard rebuilt from them), ``loading`` (weights and optimizer state back), ``optimizer_state``
(one parameter's AdamW state at any ZeRO stage), ``files`` (crash-safe directories), ``hf_files`` and
``hf_export`` (the Hugging Face export), ``export`` (its command line).
"""

from training.checkpoint.background import BackgroundSave
from training.checkpoint.files import CheckpointError, tag_for
from training.checkpoint.hf_export import check_export_dir, export_hf
from training.checkpoint.loading import CheckpointWeights, TrainerState, check_weights, restore
from training.checkpoint.resume import (
    agree_on_resume,
    changed_settings,
    checkpoint_root,
    existing_checkpoint,
    resolve_resume,
)
from training.checkpoint.saving import save

__all__ = ["BackgroundSave", "CheckpointError", "CheckpointWeights", "TrainerState", "agree_on_resume",
           "changed_settings", "check_export_dir", "check_weights", "checkpoint_root", "existing_checkpoint",
           "export_hf", "resolve_resume", "restore", "save", "tag_for"]
