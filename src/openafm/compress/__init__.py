"""Compression: palettization (lookup tables), bit allocation, int8 embedding / KV cache /
activations, the accuracy-recovery adapter, Core ML export (`coreml_export`, imported on use)."""

from openafm.compress.allocate import OperationCost, allocate_bits, measure_costs
from openafm.compress.palettize import PalettizeConfig, palettize, weighted_kmeans_1d
from openafm.compress.pipeline import (
    DEFAULT_CALIBRATION,
    CompressConfig,
    CompressionResult,
    compress_model,
)
from openafm.compress.recovery import RecoveryConfig, distillation_loss, train_recovery

__all__ = [
    "DEFAULT_CALIBRATION",
    "CompressConfig",
    "CompressionResult",
    "OperationCost",
    "PalettizeConfig",
    "RecoveryConfig",
    "allocate_bits",
    "compress_model",
    "distillation_loss",
    "measure_costs",
    "palettize",
    "train_recovery",
    "weighted_kmeans_1d",
]
