"""Every fixed set of choices a setting or a saved file takes, as a `Literal` type written once.

The CLI lists them (Typer reads the Literal), the config and the adapter file check values
against them, and the modules that act on a value take their tuple from here (`get_args`).
No heavy imports: `hydra-edge --help` reads this module.
"""

from __future__ import annotations

from typing import Literal, get_args

RowFormat = Literal["alpaca", "sharegpt", "messages", "prompt_completion", "text"]
FormatChoice = Literal["auto", RowFormat]  # --format: auto-detect, or one of the row formats
Quant = Literal["nf4", "fp4", "none"]
HeadInit = Literal["zero", "random"]
Overlong = Literal["truncate", "drop"]
MixedPrecision = Literal["auto", "bf16", "no"]
PoolOver = Literal["cluster", "sample", "prompt"]
Router = Literal["learned", "uniform"]
RouterLossSchedule = Literal["constant", "linear"]
Dtype = Literal["bf16", "fp32"]  # what a base computed in during training
LrScheduler = Literal["cosine", "linear", "constant", "cosine_with_min_lr"]
Optim = Literal["adamw", "adamw_8bit", "paged_adamw_8bit"]
Tracker = Literal["tensorboard", "mlflow", "wandb"]
ReportTo = Literal["none", Tracker, "all"]

FORMATS = get_args(RowFormat)
QUANT_CHOICES = get_args(Quant)
HEAD_INITS = get_args(HeadInit)
OVERLONG_CHOICES = get_args(Overlong)
OnnxMode = Literal["adapters", "merged", "dynamic"]  # export --format onnx --mode
OnnxPrecision = Literal["fp32", "fp16", "int4"]
OnnxDevice = Literal["cpu", "cuda"]
ONNX_MODES = get_args(OnnxMode)
ONNX_PRECISIONS = get_args(OnnxPrecision)
ONNX_DEVICES = get_args(OnnxDevice)
TRACKERS = get_args(Tracker)
