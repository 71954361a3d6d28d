"""Input validation at the public API boundary.

Everything here runs in Python on static information (shapes, dtypes, Python ints) so
that bad input fails *before* tracing with a message that says what to fix. Values that
are only known at run time (non-finite data) are handled inside the solvers by a status
code instead; see :class:`iobs_jax.Status`.
"""

from __future__ import annotations

import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def is_concrete(x: Any) -> bool:
    """True when ``x`` holds a value now (not a tracer inside jit/vmap/grad)."""
    return not isinstance(x, jax.core.Tracer)


def check_int(value: Any, name: str, *, low: int | None = None, high: int | None = None) -> int:
    """Return ``value`` as a Python int in ``[low, high]`` or raise a clear error.

    ``k``-like arguments must be static: a traced or float value cannot decide an output
    shape, so it is a ``TypeError`` rather than a silent recompile or a wrong cast.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral | np.integer):
        if isinstance(value, jax.Array | np.ndarray) and np.ndim(value) == 0 and is_concrete(
            value
        ) and jnp.issubdtype(value.dtype, jnp.integer):
            value = int(value)
        else:
            raise TypeError(
                f"{name} must be a Python int (it fixes the number of kept entries, a static "
                f"quantity); got {value!r} of type {type(value).__name__}."
            )
    value = int(value)
    if low is not None and value < low or high is not None and value > high:
        raise ValueError(f"{name} must be in [{low}, {high}]; got {name}={value}.")
    return value


def check_float_array(x: Any, name: str) -> jax.Array:
    """Convert to an inexact JAX array; integers are promoted, other dtypes are an error."""
    try:
        x = jnp.asarray(x)
    except (TypeError, ValueError) as err:  # strings, objects, ragged lists
        raise TypeError(f"{name} must be an array of real numbers; got "
                        f"{type(x).__name__} ({err}).") from None
    if jnp.issubdtype(x.dtype, jnp.complexfloating):
        raise TypeError(f"{name} must be real; got dtype {x.dtype}.")
    if not jnp.issubdtype(x.dtype, jnp.inexact):
        if jnp.issubdtype(x.dtype, jnp.integer) or x.dtype == jnp.bool_:
            x = x.astype(jnp.result_type(float))
        else:
            raise TypeError(f"{name} must hold real numbers; got dtype {x.dtype}.")
    return x


def check_finite(x: jax.Array, name: str, *, allow_inf: bool = False) -> jax.Array:
    """Reject NaN (and inf unless ``allow_inf``) in data whose value is known now.

    Inside ``jit``/``vmap`` the value is a tracer and cannot be inspected; there the
    solvers report non-finite values through ``state.status`` instead.
    """
    if not is_finite_now(x, allow_inf):
        what = "NaN" if allow_inf else "NaN or inf"
        raise ValueError(f"{name} contains {what} values; clean the input before calling.")
    return x


def is_finite_now(x: Any, allow_inf: bool = False) -> bool:
    """False only when ``x`` holds a value now and it has NaN (or inf) entries.

    Reduced on the device and only one boolean comes back; ``ensure_compile_time_eval``
    keeps the reduction eager when we are called while an outer function is traced
    (a closed-over constant is concrete there, but a jnp op on it would be traced).
    """
    x = jnp.asarray(x)
    if not is_concrete(x) or not x.size:
        return True
    with jax.ensure_compile_time_eval():
        ok = jnp.all(~jnp.isnan(x)) if allow_inf else jnp.all(jnp.isfinite(x))
        return bool(ok)


def check_finite_result(x: Any, what: str, fix: str) -> Any:
    """Eager calls must not hand back NaN: raise, saying what to fix, when a result whose
    value is known now (not traced) has NaN/inf entries; returns ``x`` unchanged."""
    if not all(is_finite_now(leaf) for leaf in jax.tree.leaves(x)):
        raise ValueError(f"{what} is not finite: {fix}")
    return x


def check_square_matrix(h: Any, size: int, name: str = "hessian") -> jax.Array:
    """A dense curvature matrix must be ``(size, size)``.

    Finiteness is not checked here: inside the solvers the matrix comes from the data,
    and bad data is reported by ``state.status``. Public projections call
    :func:`check_finite` on it themselves.
    """
    h = check_float_array(h, name)
    if h.shape != (size, size):
        raise ValueError(
            f"{name} must be a square matrix of shape ({size}, {size}) matching the "
            f"{size} parameters; got shape {h.shape}."
        )
    return h


def check_same_structure(a: Any, b: Any, name_a: str, name_b: str) -> None:
    """Two pytrees must have the same structure and leaf shapes."""
    sa, sb = jax.tree.structure(a), jax.tree.structure(b)
    if sa != sb:
        raise ValueError(f"{name_a} and {name_b} must have the same pytree structure; "
                         f"got {sa} and {sb}.")
    for la, lb in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        if jnp.shape(la) != jnp.shape(lb):
            raise ValueError(
                f"{name_a} and {name_b} must have matching leaf shapes; got {jnp.shape(la)} "
                f"and {jnp.shape(lb)}."
            )


def check_nonnegative_scalar(value: Any, name: str) -> jax.Array:
    """Scalars such as damping and step sizes may be arrays (so they can vary without a
    retrace); they are checked only when their value is known."""
    arr = jnp.asarray(value)
    if arr.ndim != 0:
        raise ValueError(f"{name} must be a scalar; got shape {arr.shape}.")
    if is_concrete(arr):
        v = float(arr)
        if not np.isfinite(v) or v < 0:
            raise ValueError(f"{name} must be a finite number >= 0; got {v}.")
    return arr


def check_positive_scalar(value: Any, name: str) -> jax.Array:
    arr = jnp.asarray(value)
    if arr.ndim == 0 and is_concrete(arr) and not float(arr) > 0:
        raise ValueError(f"{name} must be > 0; got {float(arr)}.")
    return check_nonnegative_scalar(arr, name)


def check_tol(value: Any, name: str) -> float:
    """A static, hashable tolerance: a real number >= 0, returned as a Python float."""
    if isinstance(value, bool) or not (
        isinstance(value, numbers.Real | np.generic | np.ndarray | jax.Array)
        and np.ndim(value) == 0 and is_concrete(value)
        and np.asarray(value).dtype.kind in "fiu"
    ):
        raise TypeError(f"{name} must be a real number >= 0 (a static float); got {value!r}.")
    tol = float(value)
    if not tol >= 0 or not np.isfinite(tol):
        raise ValueError(f"{name} must be a finite float >= 0; got {value!r}.")
    return tol


def check_axis(axis: Any, ndim: int, name: str = "axis") -> int:
    """A static axis index valid for rank ``ndim`` (negative counts from the end)."""
    if isinstance(axis, bool) or not isinstance(axis, numbers.Integral):
        raise TypeError(f"{name} must be an int axis index; got {axis!r}.")
    if not -ndim <= axis < ndim:
        raise ValueError(f"{name}={axis} is out of range for an array of rank {ndim}.")
    return int(axis)


def check_choice(value: Any, name: str, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}.")
    return value


def check_key(key: Any, name: str = "key") -> jax.Array:
    """A JAX PRNG key: a typed key (``jax.random.key(0)``) or a legacy ``uint32[2]`` one
    (``jax.random.PRNGKey(0)``); anything else is a TypeError saying how to make one.

    Batched keys are refused too: a function that takes one key draws one instance.
    """
    arr = key if isinstance(key, jax.Array | np.ndarray) else None
    if arr is not None and jnp.issubdtype(arr.dtype, jax.dtypes.prng_key):
        if arr.ndim == 0:
            return key
    elif arr is not None and arr.dtype == np.uint32 and arr.shape == (2,):
        return key
    raise TypeError(
        f"{name} must be one JAX PRNG key such as jax.random.key(0); got "
        f"{type(key).__name__}{' of shape ' + str(jnp.shape(key)) if arr is not None else ''}"
        f"{' ' + repr(key) if isinstance(key, int | float) else ''}.")


def check_curvature_options(damping, decay, cg_tol, cg_maxiter, **more) -> None:
    """The options shared by the curvature-based transforms (``damping`` > 0, ``decay`` in
    [0, 1), ``cg_tol`` >= 0, ``cg_maxiter`` an int >= 1), plus ``more`` positive reals
    (e.g. a learning rate), each a ValueError naming the option."""
    for name, value, test, want in (
        *((n, x, lambda v: v > 0, "> 0") for n, x in more.items()),
        ("damping", damping, lambda v: v > 0, "> 0"),
        ("decay", decay, lambda v: 0 <= v < 1, "in [0, 1)"),
        ("cg_tol", cg_tol, lambda v: v >= 0, ">= 0"),
    ):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (
                np.isfinite(value) and test(value)):
            raise ValueError(f"{name} must be a finite number {want}; got {value!r}.")
    if isinstance(cg_maxiter, bool) or not isinstance(cg_maxiter, numbers.Integral) or \
            cg_maxiter < 1:
        raise ValueError(f"cg_maxiter must be an int >= 1; got {cg_maxiter!r}.")
