"""What :func:`iobs_jax.prune` will do, decided before any work: the pruning plan.

A *target* is one weight matrix (or a stack of independent ones) to prune: a linear map
found in the program (:mod:`iobs_jax.pruning.maps`), or several maps that read the same
parameter entries (shared weights, pruned jointly on the sum of their ``H`` when asked
with ``shared="joint"``). Every parameter leaf with two or more dimensions appears in the
plan, either as targets or with the reason it is left alone.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np

from iobs_jax.pruning.maps import Analysis, LinearMap, matrix_shape
from iobs_jax.pruning.program import Program

SHARED = ("skip", "joint")


class Target(NamedTuple):
    name: str
    leaf: int
    maps: tuple[int, ...]  # indices into Analysis.maps (several: shared, pruned jointly)
    pos: np.ndarray  # (B, R, C) flat indices into the leaf
    kind: str
    note: str = ""

    shape = property(lambda self: matrix_shape(self.pos))
    problems = property(lambda self: int(self.pos.shape[0]))


class PlanEntry(NamedTuple):
    """One parameter leaf with two or more dimensions, and what pruning does with it.

    ``pruned`` leaves list their targets (``name``, ``kind``, ``shape`` as ``(outputs,
    inputs)``, ``problems`` independent matrices of that shape, ``group``: maps that read
    the same input share a group and its statistics); the others say ``why`` not.
    """

    path: str
    leaf_shape: tuple
    pruned: bool
    name: str = ""
    kind: str = ""
    shape: tuple = ()
    problems: int = 0
    group: int = -1
    why: str = ""


class Plan(NamedTuple):
    """The pruning plan of a model: :func:`prune_plan` returns it; ``str(plan)`` is a table."""

    entries: list[PlanEntry]
    targets: list[Target]
    groups: list[tuple[int, ...]]  # per selected group: indices into targets' maps

    @property
    def skipped(self) -> list[PlanEntry]:
        return [e for e in self.entries if not e.pruned]

    def __str__(self) -> str:
        head = f"{'parameter':<44} {'pruned as':<14} {'(out, in)':>14} {'grp':>4}  why not"
        lines = [head, "-" * len(head)]
        for e in self.entries:
            if e.pruned:
                shape = f"{e.problems}x{e.shape}" if e.problems > 1 else str(e.shape)
                lines.append(f"{e.name:<44} {e.kind:<14} {shape:>14} {e.group:>4}")
            else:
                lines.append(f"{e.path:<44} {'-':<14} {str(e.leaf_shape):>14} {'':>4}  {e.why}")
        kept = sum(int(np.prod(e.leaf_shape)) for e in self.entries if not e.pruned)
        total = sum(int(np.prod(e.leaf_shape)) for e in {e.path: e for e in self.entries}.values())
        n, m = len(self.targets), len(self.skipped)
        lines.append(f"{n} weight matri{'ces' if n != 1 else 'x'} pruned; {m} parameter"
                     f"{'s' if m != 1 else ''} left dense ({kept:,} of {total:,} entries in "
                     f">= 2-D parameters)")
        return "\n".join(lines)


def leaf_paths(params: Any) -> list[str]:
    """``"a/b/kernel"`` per leaf; the ``.value`` of an NNX variable is left out."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    out = []
    for path, _ in flat:
        if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name == "value":
            path = path[:-1]
        out.append(jax.tree_util.keystr(path, simple=True, separator="/"))
    return out


def _base_name(path: str) -> str:
    # Flax layers keep their weights in ".../kernel": name the layer, not the leaf.
    return path[: -len("/kernel")] if path.endswith("/kernel") else path


def find_targets(analysis: Analysis, paths: list[str], shared: str
                 ) -> tuple[list[Target], dict[int, str]]:
    """Targets per parameter leaf, and the reason for every leaf that gets none."""
    by_leaf: dict[int, list[int]] = {}
    for i, m in enumerate(analysis.maps):
        by_leaf.setdefault(m.leaf, []).append(i)
    targets, why = [], {}
    for leaf, idx in by_leaf.items():
        maps = [analysis.maps[i] for i in idx]
        other = sorted(set(analysis.other_uses.get(leaf, ())))
        base = _base_name(paths[leaf])
        if len(maps) > 1 and _disjoint(maps):
            size = sum(m.pos.size for m in maps)
            targets += [Target(f"{base}[{_slice_of(m.pos, size, len(maps), j)}]", leaf, (i,),
                               m.pos, m.kind)
                        for j, (i, m) in enumerate(zip(idx, maps, strict=True))]
            continue
        if len(maps) > 1 and not all(np.array_equal(m.pos, maps[0].pos) for m in maps):
            why[leaf] = f"read by {len(maps)} linear maps with different layouts"
            continue
        reads = "also read by " + ", ".join(_USES.get(p, p) for p in other) if other else ""
        if shared == "skip" and (len(maps) > 1 or other):
            uses = f"shared by {len(maps)} linear maps" if len(maps) > 1 else reads
            why[leaf] = f"{uses}; pass shared='joint' to prune it on all its uses"
            continue
        note = "; ".join(filter(None, [f"joint over {len(maps)} uses" if len(maps) > 1
                                       else "", reads]))
        targets.append(Target(base, leaf, tuple(idx), maps[0].pos, maps[0].kind, note))
    for leaf, prims in analysis.other_uses.items():
        if leaf not in by_leaf:
            why[leaf] = "not a linear map: read by " + ", ".join(
                _USES.get(p, p) for p in sorted(set(prims)))
    return targets, why


_USES = {
    "gather": "gather (an embedding lookup)",
    "while": "a while_loop (maps inside loops with a run-time trip count are not supported)",
    "cond": "a cond (maps inside conditionals are not supported)",
    "dot_general": "dot_general with another parameter (not acting on data)",
}


def _slice_of(pos: np.ndarray, size: int, count: int, order: int) -> int:
    """Which leading slice of a stacked leaf ``pos`` covers (scanned layers), else its
    order among the leaf's maps."""
    step = size // count
    first = int(pos.min()) // step
    if pos.size == step and int(pos.max()) // step == first:
        return first
    return order


def _disjoint(maps: list[LinearMap]) -> bool:
    flat = np.concatenate([m.pos.reshape(-1) for m in maps])
    return int(np.bincount(flat).max()) <= 1


def select(targets: list[Target], leaves: list, filt: Any) -> list[bool]:
    """Which targets the user's ``filter`` keeps (a regex on the name, or a callable)."""
    if filt is None:
        return [True] * len(targets)
    if isinstance(filt, str):
        try:
            pattern = re.compile(filt)
        except re.error as err:
            raise ValueError(f"filter {filt!r} is not a valid regular expression: {err}.") from None
        return [bool(pattern.search(t.name)) for t in targets]
    if not callable(filt):
        raise TypeError("filter must be None, a regular expression searched in the layer "
                        "name, or a callable (name, leaf) -> bool.")
    wants_shape = _wants_shape(filt)
    out = []
    for t in targets:
        leaf = leaves[t.leaf]
        out.append(bool(filt(t.name, tuple(np.shape(leaf)) if wants_shape else leaf)))
    return out


def _wants_shape(filt: Callable) -> bool:
    # The old spelling filter(name, kernel_shape) still works: it gets the leaf's shape.
    try:
        names = list(inspect.signature(filt).parameters)
    except (TypeError, ValueError):
        return False
    return len(names) >= 2 and names[1] in ("shape", "kernel_shape")


def make_groups(analysis: Analysis, targets: list[Target], chosen: list[bool]):
    """Groups of selected maps reading the same input (same value, same layout), in
    program order; returns ``(groups, group_of_map)``."""
    selected = sorted({i for t, c in zip(targets, chosen, strict=True) if c for i in t.maps},
                      key=lambda i: analysis.maps[i].node)
    keys: dict[tuple, int] = {}
    groups: list[list[int]] = []
    group_of: dict[int, int] = {}
    for i in selected:
        m = analysis.maps[i]
        key = (m.x, m.xform)
        if key not in keys:
            keys[key] = len(groups)
            groups.append([])
        groups[keys[key]].append(i)
        group_of[i] = keys[key]
    return [tuple(g) for g in groups], group_of


def plan_entries(prog: Program, paths: list[str], targets: list[Target], chosen: list[bool],
                 why: dict[int, str], group_of: dict[int, int]) -> list[PlanEntry]:
    entries = []
    by_leaf: dict[int, list[tuple[Target, bool]]] = {}
    for t, c in zip(targets, chosen, strict=True):
        by_leaf.setdefault(t.leaf, []).append((t, c))
    for leaf, vid in enumerate(prog.param_ids):
        shape = tuple(prog.avals[vid].shape)
        if len(shape) < 2:
            continue
        for t, c in by_leaf.get(leaf, []):
            if c:
                entries.append(PlanEntry(paths[leaf], shape, True, t.name, t.kind, t.shape,
                                         t.problems, group_of[t.maps[0]], t.note))
            else:
                entries.append(PlanEntry(paths[leaf], shape, False, t.name, t.kind, t.shape,
                                         t.problems, why="excluded by filter"))
        if leaf not in by_leaf:
            entries.append(PlanEntry(paths[leaf], shape, False,
                                     why=why.get(leaf, "not read by the program")))
    return entries
