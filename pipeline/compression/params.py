"""params.yaml section ``train_compressor``: the RNN codec's architecture and its training schedule."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from pipeline.schema import Section, Source

MAX_PRIMING = 8  # priming steps a params section or a model file may ask for (model.ModelConfig checks files)


class TrainCompressorParams(Section):
    # --- architecture (Toderici et al. 2017; the full size is 64-256-512-512 / 512-512-256-128) ---
    encoder_widths: tuple[int, int, int, int] = (16, 64, 128, 128)  # channels: strided conv, 3 ConvLSTMs
    decoder_widths: tuple[int, int, int, int] = (128, 128, 64, 32)  # channels of the 4 recurrent cells (÷4 by depth-to-space)
    bits: int = Field(32, ge=1, le=255)  # binary code channels per 16x16 block per iteration (32 -> 0.125 bpp)
    iterations: int = Field(16, ge=1, le=255)  # residual iterations trained (= most a file can hold)
    cell: Literal["lstm", "gru"] = "gru"  # recurrent cell of E and D (Toderici 2017 compares both)
    reconstruction: Literal["additive", "one-shot"] = "additive"  # x̂_t = D_t(b_t) + x̂_{t-1}, or = D_t(b_t)
    priming: int = Field(0, ge=0, le=MAX_PRIMING)  # extra E and D steps at the first iteration (Johnston et al. 2018)
    # --- optimisation ---
    epochs: int = Field(2, ge=1)  # passes (of patches_per_epoch patches each)
    patches_per_epoch: int | None = Field(1024, ge=1)  # training patches drawn per epoch; null: all of them
    batch_size: int = Field(8, ge=1)  # patches per step
    lr: float = Field(0.0002, gt=0)  # Adam learning rate (peak)
    lr_schedule: Literal["constant", "cosine", "multistep"] = "cosine"  # per-step schedule over the whole run
    lr_warmup: float = Field(0.1, ge=0, lt=1)  # fraction of all steps with linear warm-up
    lr_milestones: tuple[float, ...] = (0.5, 0.75)  # multistep: fractions of the run where lr *= lr_gamma
    lr_gamma: float = Field(0.5, gt=0, le=1)  # multistep: decay factor
    lr_floor: float = Field(0.02, ge=0, le=1)  # cosine: lr multiplier at the end of the decay
    weight_decay: float = Field(0.0, ge=0)  # Adam (L2) weight decay
    grad_clip: float | None = Field(1.0, gt=0)  # clip the global gradient norm; null: off
    loss: Literal["l1", "l2", "l1_ssim", "l1_msssim"] = "l1"  # |r|, r^2, or l1 mixed with 1 - SSIM / MS-SSIM, per iteration
    ssim_weight: float = Field(0.84, ge=0, le=1)  # l1_ssim: w (1 - SSIM) + (1 - w) |r| (w = 0.84: Zhao et al. 2017)
    iteration_weights: tuple[float, ...] | None = None  # loss weight of each iteration (null: all equal)
    binarizer: Literal["stochastic", "deterministic"] = "deterministic"  # training binarizer (inference: sign)
    ema_decay: float | None = Field(None, gt=0, lt=1)  # EMA of the weights, validated and published; null: off
    # warm start: weights of a model file (same architecture); null: random init
    init: Source | None = "models/rnnc-cpu.pt"
    snapshot_every: int = Field(0, ge=0)  # keep the published weights every N epochs (0: never), for curves
    # entropy model (.rnnc v3-v5): training patches whose codes fit the learned context model after training
    context_patches: int = Field(1000, ge=0)  # 0: none fitted (files are v2); not part of the training run's key
    # --- validation (held-out patches, every epoch) ---
    val_patches: int | None = Field(256, ge=1)  # held-out patches scored per epoch; null: all
    val_iterations: tuple[int, ...] = (1, 2, 4, 8, 12, 16)  # iteration counts reported (PSNR, SSIM, bpp)
    ssim_window: int = Field(11, ge=3)  # odd Gaussian window of pytorch_msssim.ssim (<= patch side)
    # --- hardware ---
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: CUDA when present
    amp: bool = True  # bf16 autocast on CUDA, and on CPUs with native bf16 (AVX512-BF16 / AMX)
    channels_last: bool = True  # NHWC memory format on CUDA (ignored on CPU)
    compile: bool = False  # torch.compile the model (untested on GPU here; off by default)
    cpu_threads: int = Field(0, ge=0)  # torch CPU threads (0: every core)
    eval_batch_size: int = Field(256, ge=1)  # patches per validation forward pass
    nproc: int = Field(1, ge=1)  # processes (GPUs) for DistributedDataParallel; >1 relaunches under torchrun

    @model_validator(mode="after")
    def _check(self) -> "TrainCompressorParams":
        for name in ("encoder_widths", "decoder_widths"):
            if any(w < 1 for w in getattr(self, name)):
                raise ValueError(f"{name}: every width must be >= 1")
        if any(w % 4 for w in self.decoder_widths):
            raise ValueError("decoder_widths: each must be a multiple of 4 (depth-to-space x2 divides by 4)")
        if any(k < 1 or k > self.iterations for k in self.val_iterations):
            raise ValueError(f"val_iterations: each must be in 1..iterations ({self.iterations})")
        if self.ssim_window % 2 == 0:
            raise ValueError("ssim_window: must be odd")
        if self.iteration_weights is not None and (len(self.iteration_weights) != self.iterations
                                                   or min(self.iteration_weights) < 0
                                                   or sum(self.iteration_weights) <= 0):
            raise ValueError(f"iteration_weights: {self.iterations} weights >= 0 (one per iteration), not all 0")
        if any(not 0 < m < 1 for m in self.lr_milestones):
            raise ValueError("lr_milestones: fractions strictly between 0 and 1")
        return self


#: the params.yaml sections this module defines: name -> schema (pipeline.config finds it: pipeline/stage.py)
PARAMS_SECTIONS = {"train_compressor": TrainCompressorParams}
