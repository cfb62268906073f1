"""Training LoRA/QLoRA adapters from a recipe: `load_recipe(path, overrides)` then `train(recipe)`."""

from adapterhub_lite.training.recipe import Recipe, load_recipe, recipe_from_dict, recipe_overrides
from adapterhub_lite.training.trainer import NegativeTransferWarning, TrainResult, total_steps, train

__all__ = [
    "NegativeTransferWarning",
    "Recipe",
    "TrainResult",
    "load_recipe",
    "recipe_from_dict",
    "recipe_overrides",
    "total_steps",
    "train",
]
