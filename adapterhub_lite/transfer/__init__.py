"""The transfer-learning study: strategies side by side, rank, layers, data budget, forgetting, negative
transfer, on the embedded base and the example tasks (`python -m benchmarks.transfer.run`)."""

from adapterhub_lite.transfer.cipher import cipher_examples, cipher_key
from adapterhub_lite.transfer.finetune import FinetuneResult, finetune, untie_output_head
from adapterhub_lite.transfer.random_init import build_random_init
from adapterhub_lite.transfer.report import summarize, write_report
from adapterhub_lite.transfer.strategies import STRATEGIES, RunSpec, run_spec
from adapterhub_lite.transfer.study import StudyConfig, plan, run_study, write_results

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
