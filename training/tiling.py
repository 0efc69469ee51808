"""``parallel.mlp_tiles``: every transformer block's MLP computed over tiles of the sequence with DeepSpeed's
``TiledMLP`` (Arctic Long Sequence Training): the forward keeps only the MLP's input, the backward runs each
tile's forward again and then its backward, so the MLP's intermediate activations (the 4h-wide up / gate
projections) exist for one tile at a time. An MLP is per token: the result is the untiled one.

The tiled function is the MLP module's own forward, installed in its place, so the module's hooks (the tensor-
and sequence-parallel region entry and exit, ZeRO-3's parameter gathering of its layers) see the whole input
as before; ``TiledMLP`` marks the MLP's parameters' gradients ready for ZeRO's reduction only at the last tile.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from modeling.pipeline import blocks_of

MLP_NAMES = ("mlp", "feed_forward")


def block_mlps(model: PreTrainedModel) -> list[nn.Module]:
    """Each block's MLP (its child named ``mlp`` or ``feed_forward``); ValueError naming what is missing or a
    mixture of experts (whose forward also returns the router's logits)."""
    found = []
    for index, block in enumerate(blocks_of(model)):
        mlp = next((getattr(block, name) for name in MLP_NAMES if isinstance(getattr(block, name, None), nn.Module)),
                   None)
        if mlp is None:
            raise ValueError(f"parallel.mlp_tiles: block {index} of model_type {model.config.model_type!r} has no "
                             f"MLP named {' or '.join(MLP_NAMES)}; set parallel.mlp_tiles=1")
        if any("expert" in name for name, _ in mlp.named_modules()):
            raise ValueError(f"parallel.mlp_tiles with the mixture-of-experts model {model.config.model_type!r}: "
                             f"its expert blocks are not tiled; set parallel.mlp_tiles=1")
        found.append(mlp)
    return found


def tile_mlps(model: PreTrainedModel, tiles: int) -> None:
    """Compute every block's MLP of ``model`` in ``tiles`` pieces of the sequence (1: untouched)."""
    if tiles == 1:
        return
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledMLP

    for mlp in block_mlps(model):
        own_forward = mlp.forward
        params = [p for p in mlp.parameters() if p.requires_grad]

        def tiled(x: torch.Tensor, *args: Any, _forward=own_forward, _mlp=mlp, _params=params) -> torch.Tensor:
            if args or x.shape[-2] < tiles:  # a decoding step's single token: nothing to tile
                return _forward(x, *args)
            # a tile of a batch of sequences is strided; GPT-2's Conv1D views its input flat
            return TiledMLP.apply(lambda _module, shard: _forward(shard.contiguous()), _mlp, x, tiles, _params)

        mlp.forward = tiled
