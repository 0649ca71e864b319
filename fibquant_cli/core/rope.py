"""Rotary position embedding (RoPE, Su et al. 2021) and its exact inverse, in numpy.

Glossary
--------
theta       the base of the frequencies: pair j of a head of ``d`` channels turns by
            ``position * theta ** (-2 j / d)`` radians.
style       which channels form pair j: ``"half"`` pairs (j, j + d/2) (``rotate_half``, as
            Llama, Qwen and Mistral do in transformers); ``"interleaved"`` pairs (2j, 2j + 1)
            (the original paper, GPT-J, llama.cpp's ``rope_type`` 0).
position    the absolute token position; a dump's token ``i`` sits at ``first_position + i``.

A post-RoPE key ``k`` at position ``p`` is ``R(p) k_raw``; ``unrotate`` applies ``R(-p)``, which
is ``R(p)``'s inverse (each pair is a plane rotation), so ``unrotate(rotate(x)) == x`` up to
float64 rounding. The angles are computed in float64 for every position (no recurrence), so
position 100,000 is as exact as position 0.
"""

from __future__ import annotations

import functools

import numpy as np

STYLES = ("half", "interleaved")


def rope_angles(positions: np.ndarray, head_dim: int, theta: float) -> np.ndarray:
    """Angles ``(t, head_dim // 2) float64``: ``positions[i] * theta ** (-2 j / head_dim)``."""
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, found {head_dim}")
    inv_freq = theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    return np.asarray(positions, dtype=np.float64)[:, None] * inv_freq[None, :]


def pair_halves(x: np.ndarray, style: str) -> tuple[np.ndarray, np.ndarray]:
    """Views (a, b) of ``x (..., d)``, (..., d/2) each: RoPE pair j is (a[..., j], b[..., j]).
    Copying them to the real and imaginary parts of a complex64 array (and back) moves a
    head between its stored channel order and ``pair_order`` with long inner loops."""
    half = x.shape[-1] // 2
    if style == "half":
        return x[..., :half], x[..., half:]
    if style == "interleaved":
        return x[..., 0::2], x[..., 1::2]
    raise ValueError(f"RoPE style {style!r} is not one of {', '.join(STYLES)}")


def _turn(x: np.ndarray, angles: np.ndarray, style: str) -> np.ndarray:
    """Float32 in, float32 out (the angles' sines and cosines still from float64): what a
    codec needs at twice the speed; anything else is computed in float64."""
    dtype = np.float32 if np.asarray(x).dtype == np.float32 else np.float64
    return _apply(np.asarray(x, dtype=dtype), np.cos(angles).astype(dtype),
                  np.sin(angles).astype(dtype), style)


def _apply(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, style: str) -> np.ndarray:
    """Each channel pair (a, b) of ``x`` turned: (a cos - b sin, a sin + b cos)."""
    a, b = pair_halves(x, style)
    out = np.empty_like(x)
    ra, rb = pair_halves(out, style)
    np.multiply(a, cos, out=ra)
    ra -= b * sin
    np.multiply(a, sin, out=rb)
    rb += b * cos
    return out


def rotate(x: np.ndarray, positions: np.ndarray, theta: float, style: str) -> np.ndarray:
    """Apply RoPE to ``x (..., t, d)``, token axis second to last; returns float64 (float32
    for float32 ``x``).

    Example::

        k = rotate(k_raw, np.arange(t), 10000.0, "half")
        np.allclose(unrotate(k, np.arange(t), 10000.0, "half"), k_raw)  # True
    """
    return _turn(x, rope_angles(positions, x.shape[-1], theta), style)


def unrotate(x: np.ndarray, positions: np.ndarray, theta: float, style: str) -> np.ndarray:
    """The exact inverse of ``rotate``: turns each pair back by the same angle."""
    return _turn(x, -rope_angles(positions, x.shape[-1], theta), style)


def pair_order(d: int, style: str) -> np.ndarray:
    """(d,) a head's channels with each RoPE pair side by side, (a_j, b_j) at 2j and 2j + 1
    (``pair_halves``): the layout whose complex64 view is ``a_j + i b_j``."""
    a, b = pair_halves(np.arange(d), style)
    return np.stack([a, b], axis=1).reshape(-1)


@functools.lru_cache(maxsize=64)
def _phasors(first: int, count: int, head_dim: int, theta: float, sign: float) -> np.ndarray:
    angles = sign * rope_angles(first + np.arange(count), head_dim, theta)
    out = np.exp(1j * angles).astype(np.complex64)[:, None, :]
    out.flags.writeable = False
    return out


def turn_pairs(x: np.ndarray, first: int, theta: float, *, inverse: bool = False) -> None:
    """``rotate`` (``unrotate`` with ``inverse``) in place of float32 ``x (t, heads, d)``, C
    contiguous, whose channels are in ``pair_order``, token i at position ``first + i``.

    One complex multiply by ``exp(i angle)``, ``(a + ib)(cos + i sin) = (a cos - b sin) +
    i (a sin + b cos)``, which is ``rotate``; the phasors are cached (a codec turns every layer
    at the same positions). 10x faster than turning the two halves of a head apart.
    """
    t, _, d = x.shape
    z = x.view(np.complex64)  # (t, heads, d / 2): the pairs
    z *= _phasors(int(first), t, d, float(theta), -1.0 if inverse else 1.0)
