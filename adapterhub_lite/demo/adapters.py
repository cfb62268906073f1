"""What the demo trains and publishes: its adapters (example tasks under new names) and tenants."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapterhub_lite.base import EMBEDDED_BASE_DIR, fingerprint
from adapterhub_lite.examples import EXAMPLES_DIR


@dataclass
class DemoAdapter:
    """One adapter the demo trains and publishes as `namespace/name@version`."""

    task: str  # folder under adapters/ (adapterhub_lite.examples.EXAMPLES_DIR)
    namespace: str
    name: str
    version: str
    overrides: dict[str, Any] = field(default_factory=dict)

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}@{self.version}"


# acme's "geo" starts on a briefly trained 1.0.0 and is promoted live to the fully trained 1.1.0.
DEMO_ADAPTERS = [
    DemoAdapter("capitals", "acme", "geo", "1.0.0", {"max_steps": 12}),
    DemoAdapter("capitals", "acme", "geo", "1.1.0"),
    DemoAdapter("animal-sounds", "acme", "animal-sounds", "1.0.0"),
    DemoAdapter("antonyms", "globex", "antonyms", "1.0.0"),
]
TENANTS = {
    "acme": {"geo": "acme/geo@1.0.0", "animals": "acme/animal-sounds@1.0.0"},
    "globex": {"opposites": "globex/antonyms@1.0.0"},
}


def _same_training(record_path: Path, recipe_dump: dict, base_fp: str) -> bool:
    try:
        record = json.loads(record_path.read_text())
    except (OSError, ValueError):
        return False
    return record.get("recipe") == recipe_dump and record.get("base", {}).get("fingerprint") == base_fp


def train_adapters(
    workdir: Path,
    log: Callable[[str], None],
    method: str = "qlora",
    *,
    adapters: list[DemoAdapter] | None = None,
    max_steps: int | None = None,
) -> dict[str, Path]:
    """Train (or reuse) the demo adapters (default: all); returns {ref: adapter_dir}.

    The demo's first step. `max_steps` caps every adapter's training (a quick check that the example
    recipes and datasets are found and train, e.g. from an installed wheel; the answers will be poor).
    """
    from adapterhub_lite.training import load_recipe, train

    base_fp = fingerprint(EMBEDDED_BASE_DIR)
    out: dict[str, Path] = {}
    for a in DEMO_ADAPTERS if adapters is None else adapters:
        run_dir = workdir / "runs" / f"{a.name}-{a.version}"
        overrides = {"method": method, "output_dir": run_dir, **a.overrides}
        if max_steps is not None:
            overrides["max_steps"] = min(max_steps, overrides.get("max_steps", max_steps))
        recipe = load_recipe(EXAMPLES_DIR / a.task / "recipe.yaml", overrides)
        if _same_training(run_dir / "training_record.json", recipe.model_dump(mode="json"), base_fp):
            log(f"  reuse  {a.ref:<28} (same recipe and base: {run_dir})")
        else:
            t0 = time.time()
            train(recipe, overwrite=True)
            log(f"  train  {a.ref:<28} {method} in {time.time() - t0:.0f} s -> {run_dir}")
        out[a.ref] = run_dir
    return out


def publish_adapters(workdir: Path, runs: dict[str, Path], log: Callable[[str], None]):
    """Pack, sign and publish each trained adapter; returns (registry, public key path)."""
    from adapterhub_lite.bundles import generate_key, pack_bundle
    from adapterhub_lite.registry import open_registry

    keys = workdir / "keys"
    if not (keys / "demo-publisher.key").exists():
        generate_key("demo-publisher", keys)
    registry = open_registry(str(workdir / "registry"))
    registry.trust(keys / "demo-publisher.pub")
    for a in DEMO_ADAPTERS:
        bundle = workdir / "bundles" / f"{a.namespace}-{a.name}-{a.version}.tar"
        bundle.parent.mkdir(parents=True, exist_ok=True)
        bundle.unlink(missing_ok=True)  # packing is reproducible: the same adapter gives the same bytes
        pack_bundle(
            runs[a.ref],
            bundle,
            namespace=a.namespace,
            name=a.name,
            version=a.version,
            signing_key=keys / "demo-publisher.key",
            archive=True,
            tags=[a.task],
            max_lora_rank=16,
        )
        p = registry.publish(bundle)
        log(f"  publish {p.ref:<27} digest {p.digest[:19]}…  signed")
    # Sharing: globex may use acme's animal-sounds by its full name.
    registry.share("acme/animal-sounds@1.0.0", "globex")
    return registry, keys / "demo-publisher.pub"
