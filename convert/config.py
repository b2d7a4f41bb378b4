"""Every setting of a conversion, in one place (`python -m convert` flags override them).

The fine-tunes (quantisation-aware training, pruning) run the training run's own input
pipeline, augmentation and class weights (train.pipeline, train.config), only briefly: they
start from the trained weights and only have to adapt them to fake quantisation or to the
pruning mask.
"""
from __future__ import annotations

from dataclasses import dataclass

QAT_OBJECTIVES = ("distill", "labels")
INT8_IO = ("int8", "float")


@dataclass
class ConvertConfig:
    # post-training int8 calibration
    representative_per_class: int = 100   # calibration images per class, from the training split
    int8_io: str = "int8"                 # int8: integer input/output; float: float I/O, int8 inside
    bias_correction: bool = True          # post-training int8 and fp16 from a copy whose biases absorb the mean
                                          # weight-rounding error (convert.bias_correction)
    empirical_bias_correction: bool = True   # post-training int8: each op's remaining mean int8 error against the
                                          # float model, measured op by op on the calibration images, taken off
                                          # its int32 bias (convert.empirical_bias)
    equalise: float | None = None         # post-training int8: residual-stream equalisation with this migration
                                          # strength alpha in [0, 1] (convert.equalisation); None: off
    linear_percentile: float | None = 99.99   # post-training int8: linear activations' ranges from this
                                          # percentile of their values (convert.export._int8_linear_percentile);
                                          # None or 100: calibration's min/max
    # quantisation-aware training
    qat_epochs: int = 2
    qat_learning_rate: float = 1e-5
    qat_objective: str = "distill"        # distill: the fake-quantised model learns the float model's logits
                                          # (mean squared error, on the training images as the device sees
                                          # them), so it stays a copy; labels: the run's own loss on the labels
                                          # (a new model: it moved 5-10 COVID-19 films away from Keras's answers)
    # pruning (prune_low_magnitude, polynomial decay from 0 to the target sparsity)
    prune_sparsity: float | None = None   # e.g. 0.5; None: no pruned variants
    prune_epochs: int = 4                 # the sparsity ramps up over all but the last epoch
                                          # (MobileNetV2 0.5 on the shared set, 50 %: two epochs lose
                                          # 8-14 points of macro-F1, four 7-8, four + one of PQAT 0)
    prune_learning_rate: float = 1e-4
    pqat_epochs: int = 1                  # pruning-preserving QAT of the pruned model
    # shared by the fine-tunes
    batch_size: int = 32
    steps_per_epoch: int | None = None    # None: the whole training split per epoch
    # parity gate (its budgets: benchmarks/gates.toml [conversion.*])
    bootstrap: int = 2000                 # paired bootstrap resamples of the metric differences' CIs
    splits: tuple[str, ...] = ("val", "test")
    # GPU check: images run on both the GPU accelerator and the CPU, and the largest allowed
    # |GPU - CPU| logit difference of a fully accelerated fp16 model (SwiftShader computes in
    # fp16 and fp32; 0.05 is far below the logit margins that decide a class)
    gpu_images: int = 16
    gpu_tolerance: float = 0.05
    seed: int = 0

    def __post_init__(self):
        if self.int8_io not in INT8_IO:
            raise ValueError(f"int8_io must be one of {INT8_IO}, got {self.int8_io!r}")
        if self.equalise is not None and not 0.0 <= self.equalise <= 1.0:
            raise ValueError(f"equalise (alpha) must be in [0, 1], got {self.equalise}")
        if self.linear_percentile is not None and not 50.0 < self.linear_percentile <= 100.0:
            raise ValueError(f"linear_percentile must be in (50, 100], got {self.linear_percentile}")
        if self.qat_objective not in QAT_OBJECTIVES:
            raise ValueError(f"qat_objective must be one of {QAT_OBJECTIVES}, got {self.qat_objective!r}")
        if self.prune_sparsity is not None and not 0.0 < self.prune_sparsity < 1.0:
            raise ValueError(f"prune sparsity must be in (0, 1), got {self.prune_sparsity}")
