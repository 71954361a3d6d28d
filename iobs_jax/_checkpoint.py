"""Save and load (pruned) parameters with their masks as one ``.npz`` file."""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
from flax import traverse_util

_SEP = "/"


def _flat(tree: Any, prefix: str) -> dict[str, np.ndarray]:
    flat = traverse_util.flatten_dict(dict(tree))
    out = {}
    for path, leaf in flat.items():
        if any(_SEP in str(p) for p in path):
            raise ValueError(f"parameter path {path} contains {_SEP!r}; cannot be saved.")
        out[prefix + _SEP.join(map(str, path))] = np.asarray(leaf)
    return out


def save_params(path: str | os.PathLike, params: Any, masks: Any = None) -> None:
    """Write ``params`` (a nested dict of arrays) and optional boolean ``masks`` to ``path``.

    Keys are ``"params/<module>/<name>"`` and ``"masks/<module>/<name>"``; dtypes are kept
    (bfloat16 is stored as float32 with its dtype recorded). Example:
    ``save_params("pruned.npz", pruned, report.masks)``.
    """
    arrays = _flat(params, "params" + _SEP)
    if masks is not None:
        arrays.update(_flat(masks, "masks" + _SEP))
    dtypes = {}
    for key, value in list(arrays.items()):
        if value.dtype.kind == "V" or value.dtype.name == "bfloat16":
            dtypes[key] = value.dtype.name
            arrays[key] = value.astype(np.float32)
    arrays["__dtypes__"] = np.array(json.dumps(dtypes))
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def load_params(path: str | os.PathLike) -> tuple[dict, dict | None]:
    """Read what :func:`save_params` wrote: ``(params, masks or None)`` as nested dicts."""
    import ml_dtypes

    with np.load(path, allow_pickle=False) as data:
        dtypes = json.loads(str(data["__dtypes__"])) if "__dtypes__" in data else {}
        trees: dict[str, dict] = {"params": {}, "masks": {}}
        for key in data.files:
            if key == "__dtypes__":
                continue
            head, _, rest = key.partition(_SEP)
            value = data[key]
            if key in dtypes:
                value = value.astype(getattr(ml_dtypes, dtypes[key]))
            trees[head][tuple(rest.split(_SEP))] = value
    params = traverse_util.unflatten_dict(trees["params"])
    masks = traverse_util.unflatten_dict(trees["masks"]) if trees["masks"] else None
    return params, masks
