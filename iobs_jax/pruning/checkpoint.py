"""Save and load (pruned) parameters with their masks as one ``.npz`` file."""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
from flax import traverse_util

_SEP = "/"


def _flat(tree: Any, prefix: str, paths: dict) -> dict[str, np.ndarray]:
    """Leaves keyed ``prefix + "a/b/c"``; ``paths`` records each key's components with
    their types (JSON cannot tell the int key 3 from the string "3")."""
    if not isinstance(tree, dict):
        raise TypeError(f"{prefix.rstrip(_SEP)} must be a nested dict of arrays; got "
                        f"{type(tree).__name__}.")
    flat = traverse_util.flatten_dict(dict(tree))
    out = {}
    for path, leaf in flat.items():
        bad = [p for p in path if not isinstance(p, str | int) or isinstance(p, bool)]
        if bad or any(_SEP in str(p) for p in path):
            raise ValueError(f"parameter path {path}: keys must be strings without {_SEP!r} "
                             f"or ints; cannot save {bad[0] if bad else path!r}.")
        key = prefix + _SEP.join(map(str, path))
        if key in out:
            raise ValueError(f"parameter paths collide when written as {key!r} (an int and a "
                             f"string key with the same digits); rename one.")
        out[key] = np.asarray(leaf)
        paths[key] = [[type(p).__name__, p] for p in path]
    return out


def save_params(path: str | os.PathLike, params: Any, masks: Any = None) -> None:
    """Write ``params`` (a nested dict of arrays) and optional boolean ``masks`` to ``path``.

    Keys are ``"params/<module>/<name>"`` and ``"masks/<module>/<name>"``; dtypes are kept
    (bfloat16 is stored as float32 with its dtype recorded). Example:
    ``save_params("pruned.npz", pruned, report.masks)``.
    """
    paths: dict = {}
    arrays = _flat(params, "params" + _SEP, paths)
    if masks is not None:
        arrays.update(_flat(masks, "masks" + _SEP, paths))
    dtypes = {}
    for key, value in list(arrays.items()):
        if value.dtype.kind == "V" or value.dtype.name == "bfloat16":
            dtypes[key] = value.dtype.name
            arrays[key] = value.astype(np.float32)
    arrays["__dtypes__"] = np.array(json.dumps(dtypes))
    arrays["__paths__"] = np.array(json.dumps(paths))
    # Written next to the target and renamed: an interrupted save never leaves a
    # truncated file under the final name.
    tmp = f"{os.fspath(path)}.partial"
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_params(path: str | os.PathLike) -> tuple[dict, dict | None]:
    """Read what :func:`save_params` wrote: ``(params, masks or None)`` as nested dicts."""
    import ml_dtypes

    with np.load(path, allow_pickle=False) as data:
        dtypes = json.loads(str(data["__dtypes__"])) if "__dtypes__" in data else {}
        paths = json.loads(str(data["__paths__"])) if "__paths__" in data else {}
        trees: dict[str, dict] = {"params": {}, "masks": {}}
        for key in data.files:
            if key in ("__dtypes__", "__paths__"):
                continue
            head, _, rest = key.partition(_SEP)
            value = data[key]
            if key in dtypes:
                value = value.astype(getattr(ml_dtypes, dtypes[key]))
            path = (tuple(int(p) if t == "int" else p for t, p in paths[key])
                    if key in paths else tuple(rest.split(_SEP)))  # older files: strings
            trees[head][path] = value
    params = traverse_util.unflatten_dict(trees["params"])
    masks = traverse_util.unflatten_dict(trees["masks"]) if trees["masks"] else None
    return params, masks
