"""Hypothesis strategies for quantization inputs: awkward alphas, ties, +-alpha, zeros, subnormals."""

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

# alphas where inv = 127/alpha is a power of two, so x * inv is exact and .5 ties stay ties.
EXACT_ALPHAS = [127.0, 127.0 / 8, 127.0 * 4, 127.0 / 1024]
AWKWARD_ALPHAS = [0.0, 1.0, 3.0, 0.1, 1e-30, 3.7321948e-37, 1e-36, 1e30, 3.4e38]

alphas = st.one_of(
    st.sampled_from(EXACT_ALPHAS + AWKWARD_ALPHAS),
    st.floats(min_value=1e-6, max_value=1e6).map(lambda a: float(np.float32(a))),
)

finite_f32 = st.floats(allow_nan=False, allow_infinity=False, width=32)


def shapes(max_dims=3, max_side=9):
    return hnp.array_shapes(min_dims=1, max_dims=max_dims, min_side=1, max_side=max_side)


@st.composite
def tensor_and_alpha(draw, max_dims=3, max_side=9):
    """(x, alpha): float32 x mixing exact .5 ties, exact +-alpha, zeros, subnormals, values beyond
    alpha and arbitrary finite floats. The first entries come from hypothesis (so failures shrink),
    the rest from a seeded generator (so large shapes stay cheap)."""
    alpha = np.float32(draw(alphas))
    shape = draw(shapes(max_dims, max_side))
    n = int(np.prod(shape))
    scale = float(np.float32(alpha / np.float32(127)))
    a = float(alpha)
    specials = np.array([0.0, -0.0, a, -a, scale * 0.5, -scale * 2.5, scale * 126.5, a * 2, 1e-45,
                         -1e-40], np.float64)
    ties = st.integers(-130, 130).map(lambda k: (k + 0.5) * scale)
    near = st.floats(-2.0, 2.0).map(lambda u: u * float(alpha))
    element = st.one_of(finite_f32, st.sampled_from(specials.tolist()), ties, near)
    head = draw(st.lists(element, min_size=min(n, 24), max_size=min(n, 24)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    tail = rng.standard_normal(n) * float(alpha) * 0.7
    pick = rng.random(n)
    tail = np.where(pick < 0.2, (rng.integers(-130, 130, n) + 0.5) * scale, tail)
    tail = np.where(pick > 0.9, specials[rng.integers(0, specials.size, n)], tail)
    tail[: len(head)] = head
    with np.errstate(over="ignore"):
        values = tail.astype(np.float32)
    values[~np.isfinite(values)] = alpha  # 2*alpha or a tie may overflow float32 for huge alphas
    return values.reshape(shape), alpha


@st.composite
def strided(draw, x):
    """x itself, or a non-contiguous view holding the same values: transposed, reversed or sliced."""
    how = draw(st.sampled_from(["plain", "transpose", "reverse", "sliced", "fortran"]))
    if how == "transpose":
        return np.ascontiguousarray(x.T).T
    if how == "reverse":
        return np.flip(np.flip(x).copy())
    if how == "sliced":
        wide = np.zeros(x.shape[:-1] + (2 * x.shape[-1],), np.float32)
        wide[..., ::2] = x
        return wide[..., ::2]
    if how == "fortran":
        return np.asfortranarray(x)
    return x
