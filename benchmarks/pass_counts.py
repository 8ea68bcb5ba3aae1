"""Memory traffic of one eager step: tensor reads + writes per parameter, by counting the
parameter-sized operands of every ATen kernel the step runs (a TorchDispatchMode).

An in-place kernel reads and writes its first tensor (``copy_``/``zero_``/``fill_`` only write
it); an out-of-place one writes its result; ``out=`` writes ``out``. The minimum is one pass:
read the parameter, its gradient and each state tensor once, write the parameter and each
state tensor once (what a fused kernel does). Printed beside each elementwise optimizer:

    python benchmarks/pass_counts.py
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import optforge as of

N = 4099          # a size no scalar or factored state has


class _Counter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.reads = self.writes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        schema = func._schema
        big = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor) and a.numel() == N]
        written = [a for arg, value in zip(schema.arguments, list(args) + [kwargs.get(a.name) for a in
                                                                            schema.arguments[len(args):]])
                   if arg.alias_info is not None and arg.alias_info.is_write
                   for a in tree_flatten(value)[0] if isinstance(a, torch.Tensor) and a.numel() == N]
        name = func.__name__.split(".")[0]
        only_written = name in ("copy_", "zero_", "fill_") or func.__name__.endswith(".out")
        self.reads += len(big) - (len(written) if only_written else 0)
        if written:
            self.writes += len(written)
        else:
            results = tree_flatten(out)[0]
            self.writes += sum(1 for r in results if isinstance(r, torch.Tensor) and r.numel() == N)
        return out


def count(cls, **kwargs) -> tuple[int, int]:
    """(accesses per parameter of one eager step after the first, the one-pass minimum)."""
    p = torch.nn.Parameter(torch.randn(N))
    eager = {"fused": False} if "fused" in cls.__init__.__code__.co_varnames else {}
    opt = cls([p], **eager, **kwargs)
    for _ in range(2):
        p.grad = torch.randn(N)
        opt.step()
    p.grad = torch.randn(N)
    counter = _Counter()
    with counter:
        opt.step()
    states = sum(1 for x in opt.state[p].values() if isinstance(x, torch.Tensor) and x.numel() == N)
    return counter.reads + counter.writes, 2 + 2 * states + 1


def main() -> None:
    print(f"{'optimizer':22s} {'eager':>6s} {'min':>4s} {'ratio':>6s}   "
          "(reads + writes per parameter per step)")
    for info in of.list_optimizers(with_info=True):
        if not info.elementwise or not info.cls.has_kernel():
            continue
        try:
            accesses, minimum = count(info.cls, lr=1e-3)
        except (TypeError, ValueError) as e:
            print(f"{info.name:22s} skipped: {e}")
            continue
        print(f"{info.name:22s} {accesses:6d} {minimum:4d} {accesses / minimum:6.2f}")


if __name__ == "__main__":
    main()
