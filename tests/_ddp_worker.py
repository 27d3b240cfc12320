"""Train a tiny model for a few steps, single-process or as one rank of torchrun; save the weights.

Used by tests/test_distributed.py: the 2-process gloo run must match the single-process run.
"""

import sys

import torch

from pipeline import distributed


def train(out_path: str) -> None:
    device = torch.device("cpu")
    d = distributed.setup(device)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 8 * 8, 10))
    ddp = distributed.wrap(model, d, device)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    gen = torch.Generator().manual_seed(1)
    x_all = torch.randn(5, 8, 3, 8, 8, generator=gen)
    y_all = torch.randint(0, 10, (5, 8), generator=gen)
    for x, y in zip(x_all, y_all):
        part = d.shard(len(x))
        loss = torch.nn.functional.cross_entropy(ddp(x[part]), y[part])
        opt.zero_grad()
        loss.backward()
        opt.step()
    if d.is_main:
        torch.save(model.state_dict(), out_path)
    distributed.teardown(d)


if __name__ == "__main__":
    train(sys.argv[1])
