"""TensorList methods with per-tensor numbers, against the same op on each tensor alone."""

import torch
from torch.testing import assert_close

from optforge.tensorlist import TensorList

LARGE = 2**18   # float32 entries: 1 MiB, where clamp_ takes one kernel per tensor


def _tensors(seed):
    torch.manual_seed(seed)
    xs = [torch.randn(n) * 3 for n in (LARGE, 10, LARGE, 7)]
    xs[1][0] = xs[2][0] = float("nan")
    return xs


def test_clamp_with_per_tensor_bounds_large_and_small():
    xs, low, high = _tensors(0), [-1.0, -0.5, -2.0, 0.0], [1.0, 0.25, 0.5, 3.0]
    out = TensorList(x.clone() for x in xs).clamp_(low, high)
    for x, y, lo, hi in zip(xs, out, low, high):
        assert_close(y, x.clamp(lo, hi), rtol=0, atol=0, equal_nan=True)
    assert out[1][0].isnan() and out[2][0].isnan()                  # NaN stays NaN


def test_add_and_addcmul_with_per_tensor_numbers():
    xs, ys, alpha = _tensors(0), _tensors(1), [0.5, -2.0, 0.5, 3.0]
    for x, y, got, a in zip(xs, ys, TensorList(xs).add(ys, alpha=alpha), alpha):
        assert_close(got, x.add(y, alpha=a), rtol=0, atol=0, equal_nan=True)
    for x, y, got in zip(xs, ys, TensorList(xs).addcmul(ys, ys, value=-1)):
        assert_close(got, x.addcmul(y, y, value=-1), rtol=0, atol=0, equal_nan=True)
