"""The transfer-learning study: strategies side by side, rank, layers, data budget, forgetting, negative
transfer, on the embedded base and the example tasks (`python -m benchmarks.transfer.run`)."""

from benchmarks.transfer.cipher import cipher_examples, cipher_key
from benchmarks.transfer.finetune import FinetuneResult, finetune, untie_output_head
from benchmarks.transfer.random_init import build_random_init
from benchmarks.transfer.render import write_report
from benchmarks.transfer.strategies import STRATEGIES, RunSpec, run_spec
from benchmarks.transfer.study import StudyConfig, plan, run_study, write_results
from benchmarks.transfer.summary import summarize

__all__ = [
    "STRATEGIES",
    "FinetuneResult",
    "RunSpec",
    "StudyConfig",
    "build_random_init",
    "cipher_examples",
    "cipher_key",
    "finetune",
    "plan",
    "run_spec",
    "run_study",
    "summarize",
    "untie_output_head",
    "write_report",
    "write_results",
]
