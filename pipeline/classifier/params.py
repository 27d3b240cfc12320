"""params.yaml section ``train_classifier``: one recipe switch, shared loop knobs, per-recipe dicts.

Units follow airbench: ``fast.lr`` and ``fast.weight_decay`` are per 1024 examples (the loss is
summed over the batch), schedules are fractions of the run.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from pipeline.data.params import AugmentationParams
from pipeline.schema import Section


class CourseworkRecipe(Section):
    """The coursework's plain CNN, Adam and a sawtooth learning rate."""

    widths: list[int] = Field([32, 64, 128], min_length=1, max_length=5)  # channels of each conv-conv-pool block
    dense: int = Field(256, ge=1)  # units of the hidden dense layer
    dropout: float = Field(0.3, ge=0, lt=1)  # before each dense layer
    batchnorm: bool = True  # BN after each conv
    lr_max: float = Field(0.001, gt=0)  # sawtooth peak (Adam learning rate)
    lr_min: float = Field(0.0001, gt=0)  # sawtooth trough
    teeth: int = Field(3, ge=1)  # k: the lr decays lr_max -> lr_min k times over the run
    weight_decay: float = Field(0.0, ge=0)  # Adam L2 penalty
    channels_last: bool = True  # NHWC memory layout (same fp32 maths): 1.6x a training step on this CPU


class FastRecipe(Section):
    """airbench-style: whitening conv, frozen-scale BN, nesterov SGD, lookahead, label smoothing."""

    widths: list[int] = Field([64, 192, 192], min_length=1, max_length=4)  # channels of each conv group
    bn_momentum: float = Field(0.6, gt=0, lt=1)  # running-stat decay (torch momentum = 1 - this)
    scale: float = Field(1 / 9, gt=0)  # logit multiplier
    lr: float = Field(11.5, gt=0)  # learning rate per 1024 examples (summed loss)
    momentum: float = Field(0.85, ge=0, lt=1)  # nesterov momentum
    weight_decay: float = Field(0.0153, ge=0)  # per 1024 examples
    bias_scaler: float = Field(64.0, gt=0)  # BN biases learn this many times faster
    label_smoothing: float = Field(0.2, ge=0, lt=1)
    warmup: float = Field(0.23, ge=0, lt=1)  # fraction of steps ramping lr 0.2x -> 1x, then linear decay
    final_lr: float = Field(0.07, ge=0)  # lr multiplier at the last step
    whiten_samples: int = Field(5000, ge=1)  # random training images the whitening conv is initialised from
    whiten_bias_epochs: float = Field(3, ge=0)  # whitening-conv bias trains this many epochs, then freezes
    lookahead_every: int = Field(5, ge=1)  # steps between lookahead (EMA) syncs
    lookahead_decay: float = Field(0.95, ge=0, lt=1)  # per-step EMA decay, ramped in by (t/T)^3
    alternating_flip: bool = True  # derandomised flip: each image flips every other epoch
    channels_last: bool = True  # NHWC memory format (CUDA and CPU)
    # mixed precision on CUDA; on a CPU only bf16, and only where it is native (AVX512-BF16 / AMX), else off
    autocast: Literal["bf16", "fp16", "off"] = "bf16"


class TrainClassifierParams(Section):
    recipe: Literal["coursework", "fast"] = "fast"  # which training recipe runs
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: CUDA when present, else all CPU cores
    epochs: float = Field(8.0, gt=0)  # passes over the training set (fast: fractions allowed)
    batch_size: int = Field(256, ge=1)  # training images per step
    eval_batch_size: int = Field(1000, ge=1)  # images per inference batch
    eval_every: int = Field(1, ge=1)  # epochs between test evaluations (the last epoch always)
    tta: Literal[0, 1, 2] = 2  # test-time augmentation: 0 none, 1 + flip, 2 + flip and 1px shifts
    augmentation: AugmentationParams = AugmentationParams()  # on-the-fly, on the training device
    checkpoint: bool = True  # save data/checkpoints/train_classifier/last.pt each epoch (resume)
    nproc: int = Field(1, ge=1)  # processes (GPUs) for DistributedDataParallel; >1 relaunches under torchrun
    coursework: CourseworkRecipe = CourseworkRecipe()
    fast: FastRecipe = FastRecipe()

    @model_validator(mode="after")
    def _integral_epochs(self):
        if self.recipe == "coursework" and self.epochs != int(self.epochs):
            raise ValueError("epochs must be a whole number for the coursework recipe")
        return self


#: the params.yaml sections this module defines: name -> schema (pipeline.config finds it: pipeline/stage.py)
PARAMS_SECTIONS = {"train_classifier": TrainClassifierParams}
