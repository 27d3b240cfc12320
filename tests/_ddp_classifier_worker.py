"""Train the classifier on synthetic data, in one process or as one rank of torchrun; save what rank 0 saw.

Used by tests/test_distributed_training.py. ``python -m tests._ddp_classifier_worker OUT``:

- ``plain``: the coursework recipe without batch norm and dropout, so a step is a deterministic
  function of the weights and the (augmented) batch: 1 and 2 processes must agree up to summation
  order. The global batch (29) splits 15 + 14: the loss weighting must handle uneven shards.
- ``fast``: the airbench recipe (batch norm per rank, so only loosely comparable); its whitening bias
  freezes after epoch 1, which makes the trainer rebuild its DDP wrapper.
"""

from __future__ import annotations

import sys

import torch

from pipeline import distributed
from pipeline.classifier.params import TrainClassifierParams
from pipeline.classifier.train import train
from tests._ddp_compressor_worker import ranks_in_sync
from tests.test_classifier_resume import synthetic

SEED = 3
PLAIN = {"recipe": "coursework", "epochs": 3, "batch_size": 29, "eval_batch_size": 64, "tta": 0,
         "augmentation": {"flip": True, "translate": 2, "cutout": 4},
         "coursework": {"widths": [8, 16], "dense": 16, "dropout": 0.0, "batchnorm": False, "lr_max": 0.003}}
FAST = {"recipe": "fast", "epochs": 3, "batch_size": 32, "eval_batch_size": 64, "tta": 0,
        "fast": {"widths": [8, 16, 16], "lookahead_every": 2, "whiten_bias_epochs": 1}}


def main(out: str) -> None:
    cpu = torch.device("cpu")
    d = distributed.setup(cpu)
    torch.set_num_threads(1)
    data = synthetic(n_train=96)
    saved: dict = {"world_size": d.world_size}
    for name, cfg in (("plain", PLAIN), ("fast", FAST)):
        result = train(TrainClassifierParams.model_validate(cfg), data, SEED, cpu, dist=d)
        saved[name] = {"state": {k: v.detach().clone() for k, v in result.model.state_dict().items()},
                       "history": result.history, "sync": ranks_in_sync(result.model, d)}
    if d.is_main:
        torch.save(saved, out)
    distributed.teardown(d)


if __name__ == "__main__":
    main(sys.argv[1])
