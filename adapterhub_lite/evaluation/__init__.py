"""Evaluation shared by the trainer and `adapterhub eval`: loss, perplexity, exact match of greedy answers."""

from adapterhub_lite.evaluation.metrics import (
    EvalResult,
    cut_at_stop,
    evaluate,
    greedy_answers,
    negative_transfer,
    token_loss,
    transfer_gain,
)
from adapterhub_lite.evaluation.run import evaluate_file

__all__ = [
    "EvalResult",
    "cut_at_stop",
    "evaluate",
    "evaluate_file",
    "greedy_answers",
    "negative_transfer",
    "token_loss",
    "transfer_gain",
]
