"""What a step's per-tensor checks cost when each tensor's metadata is cold: Python against C++.

Before a kept bucket structure is reused, a step checks every tensor once (the same parameter
objects, at the same addresses, each with a dense gradient: ``optforge.step_plan``). After
the previous step's kernel has streamed the parameters, that metadata is no longer in cache.
This times those checks two ways, each after a 128 MB copy that evicts the caches:

- Python: the C-level ``map`` passes the plan makes (identity, ``.grad``, ``is_sparse``,
  ``data_ptr``);
- C++: one compiled loop doing the same checks (built here with
  ``torch.utils.cpp_extension.load_inline``: needs a C++ compiler and ninja, ~20-60 s the
  first time), which reads each gradient without creating a Python object for it;
- C++ holding: the same loop, also taking a reference to each gradient, as code that then
  copies the gradients (``at::stack``) must.

With the same gradients each step, and with new ones from a backward pass before each step
(as in training). If C++ is no faster, the cost is the memory system's, not the interpreter's.

    python benchmarks/metadata_floor.py                 # ~1 minute after the build
    python benchmarks/metadata_floor.py --tensors 10000 --numel 64
"""

from __future__ import annotations

import argparse
import statistics
import time
from datetime import datetime, timezone
from operator import attrgetter, is_

import torch
from torch import Tensor

CHECKS = r"""
#include <torch/extension.h>
#include <torch/csrc/autograd/python_variable.h>

// True when params are the expected objects, at the expected addresses, each with a dense grad.
bool current(pybind11::list params, pybind11::list expected, pybind11::list ptrs) {
  Py_ssize_t n = PyList_GET_SIZE(params.ptr());
  if (n != PyList_GET_SIZE(expected.ptr())) return false;
  for (Py_ssize_t i = 0; i < n; i++) {
    PyObject* p = PyList_GET_ITEM(params.ptr(), i);
    if (p != PyList_GET_ITEM(expected.ptr(), i)) return false;
    const at::Tensor& t = THPVariable_Unpack(p);
    if ((int64_t)t.data_ptr() != PyLong_AsLongLong(PyList_GET_ITEM(ptrs.ptr(), i))) return false;
    const at::Tensor& g = t.grad();
    if (!g.defined() || g.is_sparse()) return false;
  }
  return true;
}

// The same, also taking a reference to each gradient (as any code that then copies the
// gradients, e.g. with at::stack, must): a write to each gradient's tensor header.
bool current_holding(pybind11::list params, pybind11::list expected, pybind11::list ptrs) {
  std::vector<at::Tensor> held(PyList_GET_SIZE(params.ptr()));
  for (Py_ssize_t i = 0; i < (Py_ssize_t)held.size(); i++) {
    held[i] = THPVariable_Unpack(PyList_GET_ITEM(params.ptr(), i)).grad();
  }
  return current(params, expected, ptrs);
}
"""

_grad, _sparse = attrgetter("grad"), attrgetter("is_sparse")


def python_checks(params: list[Tensor], expected: list[Tensor], ptrs: list[int]) -> bool:
    if not all(map(is_, params, expected)):
        return False
    grads = list(map(_grad, params))
    try:
        if sum(map(_sparse, grads)) > 0:
            return False
    except AttributeError:                      # a missing gradient
        return False
    return list(map(Tensor.data_ptr, params)) == ptrs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tensors", type=int, default=2000)
    ap.add_argument("--numel", type=int, default=2500)
    ap.add_argument("--rounds", type=int, default=41)
    args = ap.parse_args()
    from torch.utils.cpp_extension import load_inline

    start = time.perf_counter()
    try:
        ext = load_inline("optforge_metadata_floor", cpp_sources=CHECKS,
                          functions=["current", "current_holding"])
    except (RuntimeError, OSError) as e:
        raise SystemExit(f"could not build the C++ checks (this needs a C++ compiler and ninja): {e}") from e
    print(f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; extension ready in {time.perf_counter() - start:.1f} s")
    params = [torch.nn.Parameter(torch.randn(args.numel)) for _ in range(args.tensors)]
    expected, ptrs = list(params), [p.data_ptr() for p in params]
    src, dst = torch.randn(16 * 2**20), torch.empty(16 * 2**20)
    print(f"{args.tensors} tensors of {args.numel} entries; us per tensor, median of {args.rounds} "
          f"rounds, each after a 128 MB copy")
    for fresh in (False, True):
        for p in params:
            p.grad = torch.randn(args.numel)
        checks = {"python": python_checks, "c++": ext.current, "c++ holding": ext.current_holding}
        times: dict[str, list[float]] = {name: [] for name in checks}
        for _ in range(args.rounds):
            for name, check in checks.items():
                if fresh:
                    for p in params:
                        p.grad = None
                    torch.autograd.backward([p.sum() for p in params])
                dst.copy_(src)
                t0 = time.perf_counter()
                ok = check(params, expected, ptrs)
                times[name].append(time.perf_counter() - t0)
                assert ok, f"{name} checks failed on unchanged tensors"
        us = {k: statistics.median(v) / args.tensors * 1e6 for k, v in times.items()}
        label = "new gradients each round" if fresh else "the same gradients"
        print(f"{label:26s}" + "".join(f"   {k} {v:6.3f}" for k, v in us.items())
              + f"   c++ / python {us['c++'] / us['python']:5.2f}")


if __name__ == "__main__":
    main()
