"""Datasets: files read through `datasets`, the record formats, tokenization with completion-only loss
masks, and the train/eval split."""

from adapterhub_lite.data.collate import collate
from adapterhub_lite.data.formats import FORMATS, Dataset, Example, Format, file_digest, load_dataset
from adapterhub_lite.data.split import train_eval_split
from adapterhub_lite.data.tokenize import (
    IGNORE_INDEX,
    Features,
    GenerationCase,
    LengthReport,
    Overlong,
    generation_case,
    tokenize_dataset,
    tokenize_example,
    tokenize_examples,
)

__all__ = [
    "FORMATS",
    "IGNORE_INDEX",
    "Dataset",
    "Example",
    "Features",
    "Format",
    "GenerationCase",
    "LengthReport",
    "Overlong",
    "collate",
    "file_digest",
    "generation_case",
    "load_dataset",
    "tokenize_dataset",
    "tokenize_example",
    "tokenize_examples",
    "train_eval_split",
]
