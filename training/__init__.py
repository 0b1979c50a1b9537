"""prosparse.training: make ProSparse models (REFERENCE §1) from LLaMA-family checkpoints.

    recipe (config as data) → data → model surgery (ReLU / FATReLU, probe on x1)
    → λ(t) schedule → the loop → evaluation → HF checkpoint export

Python API (the CLI ``prosparse-train`` is a thin layer over it)::

    from prosparse.training import load_recipe, train
    run_dir = train(load_recipe("smollm2-135m-cpu", ["train.steps=10"]))
"""

from .evaluate import EvalResult, evaluate, sweep_threshold
from .model_io import export_hf, load_model, register_fatrelu
from .recipe import Recipe, RecipeError, load_recipe
from .schedule import lambda_at, lr_at
from .surgery import FATReLU, X1Probe, count_zeros, l1_contribution, l1_x1, set_gate_activation
from .trainer import distill_kl, train

__all__ = ["EvalResult", "FATReLU", "Recipe", "RecipeError", "X1Probe", "count_zeros", "distill_kl", "evaluate",
           "export_hf", "l1_contribution", "l1_x1", "lambda_at", "load_model", "load_recipe", "lr_at",
           "register_fatrelu", "set_gate_activation", "sweep_threshold", "train"]
