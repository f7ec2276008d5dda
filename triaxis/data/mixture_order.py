"""The order of a weighted mixture: which source, and which sample of it, global sample i of
`[[data.sources]]` reads. Pure integer functions of the weights, the epochs caps and i, kept
apart from `mixture.py` (which opens the sources and reads them in this order) so that the
arithmetic and its bound can be read, and tested, alone.

Which source index i goes to is deterministic and low-discrepancy, not random. The sources
(in config order) are the leaves of a balanced binary tree. A node holding sources of total
weight W splits its own index stream j = 0, 1, 2, ... between its halves: with q = W_left / W,
the first j indices hold A(j) = floor(j·q + 1/2) left ones (j goes left iff A(j+1) > A(j)), so
a left child's index is A(j) and a right child's j - A(j). Weights are exact fractions of the
configured floats: integer arithmetic, no rounding, the same on every machine.

The bound. At one split, any window of L consecutive indices holds A(b) - A(a) left ones, and
|A(b) - A(a) - L·q| < 1 (each A is within 1/2 of j·q). Down a path of d splits the errors add,
each scaled by the fractions below it: for ANY window of L consecutive samples, source s's
count differs from L·p_s (p_s = its weight over the total) by less than

    B_s = 1 + r_d + r_d·r_(d-1) + ... + r_d···r_2   <=  d  <=  ceil(log2 K)

samples (K sources, r_t the fraction taken at the t-th split of s's path; B_s is
`window_bound_of`, kept per source as `MixtureDataset.window_bound`). Two sources: < 1 sample;
three or four: < 2.

An `epochs` cap ends a source after floor(epochs · its windows) samples. From the next index on,
the tree is rebuilt over the remaining sources (their weights as configured: the exhausted one's
share goes to them in proportion), each continuing where it was; the bound holds within each
such phase. When every source is capped the mixture is finite, and a run that needs more
samples is refused before it starts. New weights at a resume start a phase the same way, at the
resume cursor (the checkpoint carries the history: `MixtureDataset.state`, `history_phases`).
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

# A tree is a source id (a leaf) or (num, den, left, right): the left subtree takes a fraction
# num/den of the node's indices.
Tree = int | tuple


def _build(ids: list[int], weights: list[Fraction]) -> Tree:
    if len(ids) == 1:
        return ids[0]
    half = len(ids) // 2
    left, total = ids[:half], sum(weights[i] for i in ids)
    q = sum(weights[i] for i in left) / total
    return (q.numerator, q.denominator, _build(left, weights), _build(ids[half:], weights))


def _left_before(j: int, num: int, den: int) -> int:
    """A(j) = floor(j·q + 1/2): indices among the first j of a node that went left."""
    return (2 * j * num + den) // (2 * den)


def locate_in_tree(tree: Tree, j: int) -> tuple[int, int]:
    """Index j of the tree's stream -> (source, index within the source)."""
    while not isinstance(tree, int):
        num, den, left, right = tree
        a = _left_before(j, num, den)
        if _left_before(j + 1, num, den) > a:
            tree, j = left, a
        else:
            tree, j = right, j - a
    return tree, j


def _paths(tree: Tree, path: tuple = ()) -> dict[int, tuple]:
    """source -> its path: ((num, den, went_left), ...) from the root."""
    if isinstance(tree, int):
        return {tree: path}
    num, den, left, right = tree
    return {**_paths(left, (*path, (num, den, True))), **_paths(right, (*path, (num, den, False)))}


def _count(path: tuple, j: int) -> int:
    """How many of the tree's first j indices went to the source at the end of `path`."""
    for num, den, went_left in path:
        a = _left_before(j, num, den)
        j = a if went_left else j - a
    return j


def window_bound_of(path: tuple) -> float:
    """B_s of the module docstring: the window bound of the source at the end of `path`."""
    bound, scale = 0.0, 1.0
    for num, den, went_left in reversed(path):
        bound += scale
        scale *= num / den if went_left else 1 - num / den
    return bound


@dataclass
class Phase:
    """Global indices [start, end) mixed by one tree; `offset[s]`: s's samples before start."""

    start: int
    end: int | None
    tree: Tree
    paths: dict[int, tuple]
    offset: dict[int, int]


def build_phases(
    weights: list[float], caps: list[int | None], start: int = 0, offset: dict | None = None
) -> list[Phase]:
    """The mixture's phases from global index `start`, each source having had `offset[s]`
    samples before it: a new phase each time a capped source runs out (module docstring)."""
    exact = [Fraction(w) for w in weights]
    offset = dict(offset) if offset is not None else dict.fromkeys(range(len(weights)), 0)
    active = [s for s in range(len(weights)) if not caps[s] or offset[s] < caps[s]]
    phases: list[Phase] = []
    while active:
        tree = _build(active, exact)
        paths = _paths(tree)
        ends = {s: _first_reaching(paths[s], caps[s] - offset[s]) for s in active if caps[s]}
        end = min(ends.values()) if ends else None
        phases.append(Phase(start, None if end is None else start + end, tree, paths, offset))
        if end is None:
            break
        offset = {s: offset[s] + _count(paths[s], end) for s in active}
        offset.update({s: n for s, n in phases[-1].offset.items() if s not in offset})
        active = [s for s in active if not caps[s] or offset[s] < caps[s]]
        start += end
    return phases


def history_phases(history: list[dict], caps: list[int | None]) -> list[Phase]:
    """The phases of a mixture whose weights changed at resumes: history[e] = {"start": cursor,
    "weights": [...]}, in order. Samples before each change keep the earlier weights' assignment;
    after it every source continues from its count at the change (no sample repeated or
    skipped within its own order), under the new weights."""
    phases: list[Phase] = []
    offset = None
    for e, entry in enumerate(history):
        stop = history[e + 1]["start"] if e + 1 < len(history) else None
        part = build_phases(entry["weights"], caps, entry["start"], offset)
        if stop is not None:
            part = [p for p in part if p.start < stop]
            if part and (part[-1].end is None or part[-1].end > stop):
                part[-1].end = stop
            offset = dict(enumerate(phase_counts(part, stop, len(caps)))) if part else offset
        phases += part
        if not part:
            break  # every source capped out before this change: the mixture ended there
    return phases


def phase_counts(phases: list[Phase], stop: int, n: int) -> list[int]:
    out = [0] * n
    for p in phases:
        if stop <= p.start:
            break
        j = stop - p.start if p.end is None else min(stop, p.end) - p.start
        for s, k in p.offset.items():
            out[s] = k
        for s, path in p.paths.items():
            out[s] = p.offset[s] + _count(path, j)
    return out


def _first_reaching(path: tuple, need: int) -> int:
    """The smallest j with _count(path, j) == need (counts grow by 0 or 1 per index)."""
    lo, hi = 0, 1
    while _count(path, hi) < need:
        lo, hi = hi, hi * 2
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if _count(path, mid) < need else (lo, mid)
    return lo
