"""The end-to-end demo: train, pack, sign, publish, serve per tenant, hot-swap, all on the embedded base.

`adapterhub demo` (the README's first command) calls `run_demo`. Everything lives in one work folder
(default `.adapterhub-demo/`): trained adapters are reused when their recipe and base are unchanged, the
registry keeps what was published, and the tenants are made anew on each run (their keys are shown once).
The example adapters come from `adapters/` (`adapterhub_lite.examples` finds them; a wheel ships a copy),
so the demo runs from an installed wheel as from a checkout.
"""

from adapterhub_lite.demo.adapters import (
    DEMO_ADAPTERS,
    TENANTS,
    DemoAdapter,
    publish_adapters,
    train_adapters,
)
from adapterhub_lite.demo.run import run_demo

__all__ = ["DEMO_ADAPTERS", "TENANTS", "DemoAdapter", "publish_adapters", "run_demo", "train_adapters"]
