"""The end-to-end demo: train, pack, sign, publish, serve per tenant, hot-swap, all on the embedded base.

`adapterhub demo` (the README's first command) calls `run_demo`. Everything lives in one work folder
(default `.adapterhub-demo/`): trained adapters are reused when their recipe and base are unchanged, the
registry keeps what was published, and the tenants are made anew on each run (their keys are shown once).
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapterhub_lite.base import EMBEDDED_BASE_DIR, EMBEDDED_BASE_NAME, fingerprint
from adapterhub_lite.examples import EXAMPLES_DIR


@dataclass
class DemoAdapter:
    """One adapter the demo trains and publishes as `namespace/name@version`."""

    task: str  # folder under adapterhub_lite/examples/
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


def train_adapters(workdir: Path, log: Callable[[str], None], method: str = "qlora") -> dict[str, Path]:
    """Train (or reuse) every demo adapter; returns {ref: adapter_dir}."""
    from adapterhub_lite.training import load_recipe, train

    base_fp = fingerprint(EMBEDDED_BASE_DIR)
    out: dict[str, Path] = {}
    for a in DEMO_ADAPTERS:
        run_dir = workdir / "runs" / f"{a.name}-{a.version}"
        recipe = load_recipe(
            EXAMPLES_DIR / a.task / "recipe.yaml",
            {"method": method, "output_dir": run_dir, **a.overrides},
        )
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
    from adapterhub_lite.registry import Registry

    keys = workdir / "keys"
    if not (keys / "demo-publisher.key").exists():
        generate_key("demo-publisher", keys)
    registry = Registry.open(str(workdir / "registry"))
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


def heldout_questions(task: str, limit: int = 8) -> list[tuple[str, str, str]]:
    """(kind, prompt, expected answer) for held-out examples of a task, as the recipe splits them."""
    from adapterhub_lite.data import load_dataset, train_eval_split
    from adapterhub_lite.training import load_recipe

    recipe = load_recipe(EXAMPLES_DIR / task / "recipe.yaml")
    data = load_dataset(recipe.data, recipe.format)
    _, held_out = train_eval_split(data.examples, recipe.eval_fraction, recipe.seed)
    out = []
    for ex in held_out[:limit]:
        if ex.format == "chat":
            out.append(("chat", ex.messages[0]["content"], ex.messages[-1]["content"]))
        else:
            out.append(("completion", ex.prompt, ex.completion))
    return out


def ask(client, model: str, kind: str, prompt: str) -> str:
    """One greedy request through the OpenAI client; returns the answer text."""
    if kind == "chat":
        r = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": prompt}], max_tokens=8, temperature=0
        )
        return (r.choices[0].message.content or "").strip()
    r = client.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0, stop=["\n"])
    return r.choices[0].text.strip()


def accuracy(client, model: str, questions: list[tuple[str, str, str]]) -> tuple[float, list[str]]:
    answers = [ask(client, model, kind, p) for kind, p, _ in questions]
    hits = sum(a == want.strip() for a, (_, _, want) in zip(answers, questions, strict=True))
    return hits / len(questions), answers


def _status_of(fn: Callable[[], Any]) -> int:
    import openai

    try:
        fn()
        return 200
    except openai.APIStatusError as exc:
        return exc.status_code


def run_demo(workdir: Path = Path(".adapterhub-demo"), *, method: str = "qlora", log=print) -> dict:
    """Run the whole path and return the summary (also written to `workdir/demo_summary.json`)."""
    import httpx
    import openai

    from adapterhub_lite.serving.launcher import ServeOptions, VLLMServer
    from adapterhub_lite.serving.tenancy import TenantStore

    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    summary: dict[str, Any] = {"base": str(EMBEDDED_BASE_DIR), "base_fingerprint": fingerprint(None)}

    log(f"1/5 train the example adapters on the embedded base ({method})")
    runs = train_adapters(workdir, log, method)
    summary["training"] = {
        ref: json.loads((d / "training_record.json").read_text())["metrics"] for ref, d in runs.items()
    }

    log("2/5 pack, sign and publish them to the registry")
    _, pubkey = publish_adapters(workdir, runs, log)

    log("3/5 create tenants")
    db = workdir / "tenants.db"
    for stale in (db, db.with_suffix(".db-wal"), db.with_suffix(".db-shm")):
        stale.unlink(missing_ok=True)
    store = TenantStore.open(db)
    keys: dict[str, str] = {}
    for tenant, aliases in TENANTS.items():
        # acme may also call the base model itself; globex may not.
        _, keys[tenant] = store.add_tenant(tenant, base_access=tenant == "acme")
        for alias, ref in aliases.items():
            store.set_alias(tenant, alias, ref)
        log(f"  tenant {tenant:<7} key {keys[tenant][:14]}…  aliases {aliases}")

    log("4/5 start vLLM with the adapterhub plugin (about a minute on 2 cores)")
    cache = workdir / "cache"
    shutil.rmtree(cache, ignore_errors=True)  # show real pulls from the registry
    opts = ServeOptions(
        base_dir=str(EMBEDDED_BASE_DIR),
        registry=str(workdir / "registry"),
        tenants_db=str(db),
        cache_dir=str(cache),
        trusted_keys=[str(pubkey)],
        max_lora_rank=16,
        max_loras=4,
        max_cpu_loras=8,
        log_path=str(workdir / "vllm.log"),
    )
    with VLLMServer(opts) as server:
        log(f"  serving at {server.url} (log: {opts.log_path})")
        client = {
            t: openai.OpenAI(base_url=server.url + "/v1", api_key=k, max_retries=0) for t, k in keys.items()
        }

        log("5/5 requests as each tenant, with the official openai client")
        questions = {task: heldout_questions(task) for task in ("capitals", "animal-sounds", "antonyms")}
        rows = []
        for tenant, model, task in [
            ("acme", EMBEDDED_BASE_NAME, "capitals"),  # the base alone, for comparison
            ("acme", "geo", "capitals"),
            ("acme", "animals", "animal-sounds"),
            ("globex", "opposites", "antonyms"),
            ("globex", "acme/animal-sounds@1.0.0", "animal-sounds"),  # shared with globex
        ]:
            acc, answers = accuracy(client[tenant], model, questions[task])
            kind, prompt, want = questions[task][0]
            rows.append({"tenant": tenant, "model": model, "task": task, "exact_match": acc})
            log(
                f"  {tenant:<7} {model:<26} exact match {acc:4.0%}   e.g. {prompt!r} -> {answers[0]!r}"
                f" (want {want.strip()!r})"
            )

        log("  isolation: what a tenant may not reach")
        kind, prompt, _ = questions["capitals"][0]
        denials = {
            "globex -> acme's alias 'geo'": _status_of(lambda: ask(client["globex"], "geo", kind, prompt)),
            "globex -> acme/geo@1.0.0": _status_of(
                lambda: ask(client["globex"], "acme/geo@1.0.0", kind, prompt)
            ),
            "globex -> the base model": _status_of(
                lambda: ask(client["globex"], EMBEDDED_BASE_NAME, kind, prompt)
            ),
            "no key": httpx.post(
                server.url + "/v1/completions", json={"model": "geo", "prompt": "x"}
            ).status_code,
            "wrong key": _status_of(
                lambda: ask(
                    openai.OpenAI(base_url=server.url + "/v1", api_key="ahk_wrong", max_retries=0),
                    "geo",
                    kind,
                    prompt,
                )
            ),
            "acme -> /v1/load_lora_adapter": httpx.post(
                server.url + "/v1/load_lora_adapter",
                json={"lora_name": "x", "lora_path": "/tmp"},
                headers={"Authorization": f"Bearer {keys['acme']}"},
            ).status_code,
        }
        for what, status in denials.items():
            log(f"  {what:<34} -> HTTP {status}")
        globex_models = [m.id for m in client["globex"].models.list().data]
        log(f"  globex's /v1/models: {globex_models}")

        log("  hot swap: promote acme's 'geo' from 1.0.0 to 1.1.0, no restart")
        before, _ = accuracy(client["acme"], "geo", questions["capitals"])
        t0 = time.perf_counter()
        store.set_alias("acme", "geo", "acme/geo@1.1.0")
        after, answers = accuracy(client["acme"], "geo", questions["capitals"][:1])
        swap_s = time.perf_counter() - t0
        after, answers = accuracy(client["acme"], "geo", questions["capitals"])
        log(f"  geo exact match {before:.0%} -> {after:.0%}; first 1.1.0 answer {swap_s:.2f} s after promote")
        store.set_alias("acme", "geo", "acme/geo@1.0.0")
        rolled, _ = accuracy(client["acme"], "geo", questions["capitals"])
        log(f"  rollback (same command): exact match {rolled:.0%}")
        store.set_alias("acme", "geo", "acme/geo@1.1.0")

        metrics = httpx.get(
            server.url + "/metrics", headers={"Authorization": f"Bearer {server.admin_key}"}
        ).text
        ours = [ln for ln in metrics.splitlines() if ln.startswith("adapterhub_") and "_created{" not in ln]

    summary.update(
        requests=rows,
        denials=denials,
        globex_models=globex_models,
        hot_swap={"before": before, "after": after, "rollback": rolled, "promote_to_first_token_s": swap_s},
        wall_seconds=round(time.time() - t_start, 1),
    )
    (workdir / "demo_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    log("\nsummary")
    log(f"  {'tenant':<8} {'model':<26} {'task':<14} exact match")
    for r in rows:
        log(f"  {r['tenant']:<8} {r['model']:<26} {r['task']:<14} {r['exact_match']:.0%}")
    log(f"  hot swap geo 1.0.0 -> 1.1.0: {before:.0%} -> {after:.0%}; rollback {rolled:.0%}")
    log("  server metrics (adapterhub_*):")
    for ln in ours[:20]:
        log(f"    {ln}")
    log(f"done in {summary['wall_seconds']:.0f} s; summary in {workdir / 'demo_summary.json'}")
    return summary


__all__ = ["DEMO_ADAPTERS", "run_demo"]
