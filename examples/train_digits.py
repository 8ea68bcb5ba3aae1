"""Train a small MLP on scikit-learn's 8x8 digits with any optforge optimizer.

    python examples/train_digits.py --optimizer_type LodeW --optimizer_args amp_fac=2 centralization=1
    python examples/train_digits.py --optimizer_type sgd --lr 0.1 --optimizer_args momentum=0.9 nesterov=true

The optimizer comes from exactly two calls: ``optforge.add_optimizer_args(parser)`` adds
``--optimizer_type`` / ``--optimizer_args``, and ``optforge.optimizer_from_args(model, args)``
builds it (``--lr`` / ``--weight_decay`` are passed when given). The lr follows
``optforge.schedules.warmup_cosine``. Runs in a few seconds on a laptop CPU.
"""

from __future__ import annotations

import argparse

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from torch.nn import functional as F

import optforge


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    optforge.add_optimizer_args(parser)
    parser.add_argument("--lr", type=float, default=None, help="default: the optimizer's own")
    parser.add_argument("--weight_decay", type=float, default=None, help="default: the optimizer's own")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--warmup_steps", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)  # tiny matmuls: extra threads only add overhead

    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.25, random_state=args.seed, stratify=y)
    x_train, x_test = (torch.tensor(a / 16.0, dtype=torch.float32) for a in (x_train, x_test))
    y_train, y_test = (torch.tensor(a) for a in (y_train, y_test))

    model = nn.Sequential(nn.Linear(64, 128), nn.LayerNorm(128), nn.GELU(), nn.Linear(128, 10))
    opt = optforge.optimizer_from_args(model, args)
    steps_per_epoch = -(-len(x_train) // args.batch_size)
    total = args.epochs * steps_per_epoch
    sched = optforge.schedules.warmup_cosine(opt, warmup_steps=min(args.warmup_steps, total),
                                             total_steps=total)
    print(f"optimizer: {type(opt).__name__} {opt.defaults}")

    for epoch in range(1, args.epochs + 1):
        model.train()
        perm = torch.randperm(len(x_train))
        total_loss = 0.0
        for i in range(0, len(x_train), args.batch_size):
            idx = perm[i:i + args.batch_size]
            loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total_loss += loss.item() * len(idx)
        if epoch == 1 or epoch == args.epochs or epoch % 5 == 0:
            lr = sched.get_last_lr()[0]
            print(f"epoch {epoch:3d}  train loss {total_loss / len(x_train):.4f}  lr {lr:.2e}")

    model.eval()
    with torch.no_grad():
        accuracy = (model(x_test).argmax(dim=1) == y_test).float().mean().item()
    print(f"test accuracy: {accuracy:.4f}")
    return accuracy


if __name__ == "__main__":
    main()
