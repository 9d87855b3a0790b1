"""The pure layer split: which global layers each stage holds, and which may stay unconstrained.

Plain numbers in, ranges out: the run config validates its stage split with these (it is the
config's own rule) and `core.stages` builds stages from them.
"""

from __future__ import annotations

from pmnode.errors import ConfigError


def split_layers(n_layers: int, n_stages: int, explicit: list[int] | None = None) -> list[range]:
    """Global layer ranges per stage. Even split puts the remainder on the earliest stages.

    >>> split_layers(5, 2)
    [range(0, 3), range(3, 5)]
    """
    if n_stages < 1:
        raise ConfigError(f"n_stages must be >= 1, got {n_stages}")
    if explicit is not None:
        if len(explicit) != n_stages:
            raise ConfigError(f"stage_layers has {len(explicit)} entries but n_stages={n_stages}")
        if any(n < 1 for n in explicit):
            raise ConfigError(f"stage_layers={explicit} would leave a stage empty")
        if sum(explicit) != n_layers:
            raise ConfigError(f"stage_layers={explicit} sums to {sum(explicit)}, not n_layers={n_layers}")
        sizes = list(explicit)
    else:
        if n_stages > n_layers:
            raise ConfigError(f"{n_stages} stages over {n_layers} layers would leave a stage empty")
        base, extra = divmod(n_layers, n_stages)
        sizes = [base + (i < extra) for i in range(n_stages)]
    out, start = [], 0
    for n in sizes:
        out.append(range(start, start + n))
        start += n
    return out


def free_layer_range(
    n_layers: int, n_stages: int, explicit: list[int] | None, tail_layers: int, constrained: bool
) -> range:
    """Global ids of the unconstrained layers (all of them without a subspace); the last
    `tail_layers` must all sit in the last stage, since no boundary may follow a free layer."""
    if not constrained:
        return range(0, n_layers)
    free = range(n_layers - tail_layers, n_layers)
    tail = split_layers(n_layers, n_stages, explicit)[-1]
    if len(free) and free.start < tail.start:
        raise ConfigError(
            f"subspace.uncompressed_tail_layers={len(free)} but the tail stage holds {len(tail)} layer(s); "
            "lower it or use fewer stages, since an unconstrained layer before a boundary breaks compression"
        )
    return free
