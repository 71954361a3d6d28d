"""``iobs_jax.bert``: the BERT encoder of :mod:`iobs_jax.models.bert` and
:func:`prune_encoder` (:mod:`iobs_jax.pruning.encoder`), under their first name.

The model module knows nothing of pruning; this top-floor module puts the two together
for code written against the old layout.
"""

from typing import Any

from iobs_jax.models import bert as _bert
from iobs_jax.models.bert import *  # noqa: F403
from iobs_jax.pruning.encoder import prune_encoder

__all__ = [*_bert.__all__, "prune_encoder"]


def __getattr__(name: str) -> Any:  # private helpers of the model module
    return getattr(_bert, name)
