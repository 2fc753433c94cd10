"""Distillation (`posttrain distill`): entry point `run_distill(DistillRecipe) -> final/`."""

from posttrain.train.distill.config import DistillRecipe
from posttrain.train.distill.run import distill_main, run_distill

__all__ = ["DistillRecipe", "distill_main", "run_distill"]
