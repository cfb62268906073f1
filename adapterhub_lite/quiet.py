"""Keeping third-party noise that means nothing to a user off the terminal.

Each entry below is one known message from one library, matched narrowly (its logger or warning
module and the start of its text), so any other warning from the same library still shows.
`quiet_third_party(verbose=True)` changes nothing: `--verbose` shows everything.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import warnings
from collections.abc import Iterator

# (logger name, message prefix): log records dropped while quiet.
_LOG_NOISE = [
    # bitsandbytes tries to fetch an optional CPU kernel from the Hugging Face hub when its ops module is
    # imported; the fallback it uses instead is the one we test with.
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community"),
]

# (module regex, message regex): warnings ignored while quiet.
_WARNING_NOISE = [
    # peft asks the hub whether a local base has a config.json when saving; we never fetch from a hub.
    (r"peft(\.|$)", r"Unable to fetch remote file"),
    (r"peft(\.|$)", r"Could not find a config file in "),
]


class _DropPrefixes(logging.Filter):
    def __init__(self, prefixes: list[str]) -> None:
        super().__init__()
        self.prefixes = tuple(prefixes)

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


@contextlib.contextmanager
def _no_loader_bars() -> Iterator[None]:
    """Hide transformers' and huggingface_hub's progress bars ("Loading weights"), then restore them."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    hub_was_off = are_progress_bars_disabled()
    tf = sys.modules.get("transformers.utils.logging")
    # transformers reads the hub's setting when first imported, so one imported later inherits "off".
    tf_was_on = tf.is_progress_bar_enabled() if tf is not None else not hub_was_off
    disable_progress_bars()
    if tf is not None:
        tf.disable_progress_bar()
    try:
        yield
    finally:
        tf = sys.modules.get("transformers.utils.logging")
        if tf is not None and tf_was_on:
            tf.enable_progress_bar()
        if hub_was_off:
            disable_progress_bars()
        else:
            enable_progress_bars()


@contextlib.contextmanager
def quiet_third_party(verbose: bool = False) -> Iterator[None]:
    """Within the block, drop the known third-party messages listed above; `verbose=True` drops nothing.

    Use it around a command's work: `with quiet_third_party(verbose): ...`. Not thread-safe (it changes
    the process's warning filters), like `warnings.catch_warnings`, which it uses.
    """
    if verbose:
        yield
        return
    prefixes: dict[str, list[str]] = {}
    for name, prefix in _LOG_NOISE:
        prefixes.setdefault(name, []).append(prefix)
    filters = {name: _DropPrefixes(p) for name, p in prefixes.items()}
    for name, flt in filters.items():
        logging.getLogger(name).addFilter(flt)
    try:
        with warnings.catch_warnings(), _no_loader_bars():
            for module, message in _WARNING_NOISE:
                warnings.filterwarnings("ignore", message=message, module=module)
            yield
    finally:
        for name, flt in filters.items():
            logging.getLogger(name).removeFilter(flt)


__all__ = ["quiet_third_party"]
