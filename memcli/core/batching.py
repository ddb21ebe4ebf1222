"""Batches: the one batch planner every backend uses (training's padded batches, the torch backend's, the
llama.cpp backend's packed sequences). Torch-free, so that the llama.cpp path of `memcli verify` never imports
torch."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator


def plan_batches(lengths, budget: int, *, padded: bool = False, max_seqs: int | None = None) -> list[tuple[int, int]]:
    """Consecutive [start, end) groups of entries, in the order given. A group's cost is its total tokens
    (packed sequences) or, with padded, entries x its longest entry (right-padded rows); it stays within
    `budget` (an entry over it is a group of its own) and holds at most `max_seqs` entries."""
    return [(start, start + len(group))
            for start, group in iter_groups(lengths, int, budget, padded=padded, max_seqs=max_seqs)]


def iter_groups(items: Iterable, length: Callable, budget: int, *, padded: bool = False,
                max_seqs: int | None = None) -> Iterator[tuple[int, list]]:
    """plan_batches over a stream: (index of the group's first item, the group's items), pulling items only
    as far as the next group needs (the groups plan_batches gives on the same lengths)."""
    start, group, used, width = 0, [], 0, 0
    for item in items:
        n = int(length(item))
        cost = (len(group) + 1) * max(width, n) if padded else used + n
        if group and (cost > budget or (max_seqs is not None and len(group) >= max_seqs)):
            yield start, group
            start, group, used, width = start + len(group), [], 0, 0
        group.append(item)
        used, width = used + n, max(width, n)
    if group:
        yield start, group
