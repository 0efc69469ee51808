"""Pure functions: which transformer blocks (and the embedding / loss ends) each pipeline stage holds.

A model of ``L`` blocks is cut into ``p * v`` chunks (``v`` virtual stages per rank for the interleaved
schedule); chunk ``c`` runs on pipeline rank ``c % p``. The first chunk also embeds, the last also applies
the final norm, head and loss.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StageSpec:
    """One chunk of the model: a contiguous range of blocks, plus the embedding and/or the head."""

    blocks: range
    embed: bool = False
    head: bool = False


def uniform(num_layers: int, chunks: int) -> list[range]:
    """Split ``num_layers`` blocks into ``chunks`` contiguous ranges whose sizes differ by at most one
    (earlier chunks get the extra blocks)."""
    if chunks > num_layers:
        raise ValueError(f"{chunks} pipeline chunks (stages x virtual stages) exceed the {num_layers} layers; "
                         f"lower parallel.pipeline or parallel.virtual_stages")
    base, extra = divmod(num_layers, chunks)
    bounds, start = [], 0
    for c in range(chunks):
        size = base + (1 if c < extra else 0)
        bounds.append(range(start, start + size))
        start += size
    return bounds


def balanced(weights: list[int], chunks: int) -> list[range]:
    """Contiguous ranges minimising the largest per-chunk weight (e.g. parameter count); each chunk gets
    at least one item. Exact: binary search on the bottleneck with a greedy feasibility check."""
    if chunks > len(weights):
        raise ValueError(f"{chunks} pipeline chunks exceed the {len(weights)} layers")

    def cut(limit: int) -> list[range] | None:
        ranges: list[range] = []
        start, total = 0, 0
        for i, w in enumerate(weights):
            remaining_items, remaining_chunks = len(weights) - i, chunks - len(ranges)
            if total + w > limit or (i > start and remaining_items < remaining_chunks):
                ranges.append(range(start, i))
                start, total = i, 0
            total += w
        ranges.append(range(start, len(weights)))
        return ranges if len(ranges) == chunks and all(len(r) for r in ranges) else None

    lo, hi = max(weights), sum(weights)
    while lo < hi:
        mid = (lo + hi) // 2
        if cut(mid) is not None:
            hi = mid
        else:
            lo = mid + 1
    result = cut(lo)
    if result is None:  # fewer natural cuts than chunks: fall back to equal counts
        return uniform(len(weights), chunks)
    return result


def parse_partition(partition: str, num_layers: int, chunks: int) -> list[StageSpec]:
    """``"E,t,t|t,t,t|t,t,L"``: chunks separated by ``|``; ``E`` = embedding (first chunk only), ``t`` = one
    transformer block, ``L`` = final norm + head + loss (last chunk only)."""
    parts = [p.strip() for p in partition.split("|")]
    if len(parts) != chunks:
        raise ValueError(f"parallel.partition={partition!r} has {len(parts)} stages, expected {chunks} "
                         f"(pipeline x virtual_stages)")
    specs, start = [], 0
    for index, part in enumerate(parts):
        items = [i.strip() for i in part.split(",") if i.strip()]
        bad = [i for i in items if i not in ("E", "t", "L")]
        if bad:
            raise ValueError(f"parallel.partition: unknown item(s) {bad} in stage {index}; use E, t and L")
        if "E" in items and (index != 0 or items[0] != "E"):
            raise ValueError("parallel.partition: E (embedding) must open the first stage")
        if "L" in items and (index != chunks - 1 or items[-1] != "L"):
            raise ValueError("parallel.partition: L (head and loss) must close the last stage")
        n = items.count("t")
        specs.append(StageSpec(range(start, start + n), embed="E" in items, head="L" in items))
        start += n
    if start != num_layers:
        raise ValueError(f"parallel.partition={partition!r} places {start} blocks but the model has {num_layers}")
    if not specs[0].embed or not specs[-1].head:
        raise ValueError("parallel.partition must start with E and end with L")
    if any(len(s.blocks) == 0 and not (s.embed or s.head) for s in specs):
        raise ValueError("parallel.partition: every stage needs at least one item")
    return specs


def stage_specs(num_layers: int, pipeline: int, virtual_stages: int = 1, method: str = "uniform",
                block_weights: list[int] | None = None) -> list[StageSpec]:
    """All ``pipeline * virtual_stages`` chunks in model order. ``method``: 'uniform', 'parameters' or
    'measured' (balanced by ``block_weights``: parameter counts, measured times) or an explicit partition string."""
    chunks = pipeline * virtual_stages
    if method == "uniform":
        ranges = uniform(num_layers, chunks)
    elif method in ("parameters", "measured"):
        if block_weights is None or len(block_weights) != num_layers:
            raise ValueError(f"partition by {method} needs one weight per block")
        ranges = balanced(block_weights, chunks)
    else:
        return parse_partition(method, num_layers, chunks)
    return [StageSpec(r, embed=(i == 0), head=(i == chunks - 1)) for i, r in enumerate(ranges)]


def chunks_of_rank(specs: list[StageSpec], pipeline: int, pp_rank: int) -> list[StageSpec]:
    """The chunks that pipeline rank ``pp_rank`` runs, in order (model chunk ``c`` is on rank ``c % p``)."""
    return specs[pp_rank::pipeline]


def partition_string(specs: list[StageSpec]) -> str:
    """The partition string of ``specs`` (what ``parse_partition`` reads): 'E,t,t|t,t,L'."""
    return "|".join(",".join((["E"] if s.embed else []) + ["t"] * len(s.blocks) + (["L"] if s.head else []))
                    for s in specs)
