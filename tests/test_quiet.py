"""quiet_third_party drops the known third-party messages, only those, and nothing with verbose=True."""

from __future__ import annotations

import logging
import warnings

import pytest

from adapterhub_lite.quiet import quiet_third_party

BNB_LOGGER = "bitsandbytes.backends.cpu.ops"
BNB_NOISE = "Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure ..."
PEFT_NOISE = [
    "Unable to fetch remote file due to the following error boom - silently ignoring the lookup",
    "Could not find a config file in ahl-tiny-llama - will assume that the vocabulary was not modified.",
]


def _warn(message: str, module: str) -> None:
    # As peft raises them: a UserWarning attributed to the peft module that called warnings.warn.
    warnings.warn_explicit(message, UserWarning, f"/site-packages/{module.replace('.', '/')}.py", 1, module)


def _warnings_seen(verbose: bool | None, emit) -> list[str]:
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        if verbose is None:
            emit()
        else:
            with quiet_third_party(verbose):
                emit()
    return [str(w.message) for w in seen]


def test_peft_hub_lookup_warnings_dropped_other_warnings_kept():
    def emit():
        for msg in PEFT_NOISE:
            _warn(msg, "peft.utils.other")
        _warn("Already found a `peft_config` attribute in the model.", "peft.tuners.tuners_utils")
        _warn(PEFT_NOISE[0], "mypackage.other")  # same text from someone else: not ours to hide

    assert _warnings_seen(False, emit) == [
        "Already found a `peft_config` attribute in the model.",
        PEFT_NOISE[0],
    ]
    assert len(_warnings_seen(True, emit)) == 4
    assert len(_warnings_seen(None, emit)) == 4  # the filters are gone after the block


def test_bitsandbytes_kernel_fetch_log_dropped_other_records_kept(caplog):
    log = logging.getLogger(BNB_LOGGER)
    caplog.set_level(logging.WARNING, logger=BNB_LOGGER)  # whatever another test set on "bitsandbytes"
    with quiet_third_party(False):
        log.warning(BNB_NOISE, "no network")
        log.warning("a real bitsandbytes warning")
    assert [r.getMessage() for r in caplog.records] == ["a real bitsandbytes warning"]

    caplog.clear()
    with quiet_third_party(True):
        log.warning(BNB_NOISE, "no network")
    log.warning(BNB_NOISE, "after the block")
    assert len(caplog.records) == 2
    assert log.filters == []


def test_loader_bars_hidden_inside_and_restored_after():
    from transformers.utils import logging as tf_logging

    tf_logging.enable_progress_bar()
    with quiet_third_party(False):
        assert not tf_logging.is_progress_bar_enabled()
    assert tf_logging.is_progress_bar_enabled()
    with quiet_third_party(True):
        assert tf_logging.is_progress_bar_enabled()

    tf_logging.disable_progress_bar()  # a user's choice survives the block
    try:
        with quiet_third_party(False):
            pass
        assert not tf_logging.is_progress_bar_enabled()
    finally:
        tf_logging.enable_progress_bar()


def test_filters_removed_when_the_block_raises():
    with pytest.raises(RuntimeError), quiet_third_party(False):
        raise RuntimeError("boom")
    assert logging.getLogger(BNB_LOGGER).filters == []
    assert len(_warnings_seen(None, lambda: _warn(PEFT_NOISE[0], "peft.utils.other"))) == 1
