"""The serving plugin end to end: a real vLLM server on loopback (started once), the official openai client.

Adapters are small real PEFT LoRA adapters on the embedded base with large random weights, so each one's
greedy output differs visibly from the base's and from every other's; they go through the real bundle
format and the real registry, and the server pulls and verifies them itself.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from needs import missing
from typer.testing import CliRunner

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

PROMPT_IDS = [5, 120, 240, 360, 480, 600]
N_TOKENS = 8
TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj"]


def _base_dir() -> Path:
    from adapterhub_lite.base import EMBEDDED_BASE_DIR

    env = os.environ.get("ADAPTERHUB_TEST_BASE")
    path = Path(env) if env else EMBEDDED_BASE_DIR
    if not (path / "config.json").is_file():
        missing(f"no base model at {path} (run `make base`, or set ADAPTERHUB_TEST_BASE)")
    return path


def _make_adapters(
    base: Path, out: Path, seeds: dict[str, int]
) -> tuple[dict[str, Path], dict[str, list[int]]]:
    """PEFT adapters with random A/B (scaled up) for each name; also the greedy tokens offline with peft."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    def fresh_base():
        return AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()

    def greedy(model) -> list[int]:
        ids = torch.tensor([PROMPT_IDS])
        with torch.no_grad():
            for _ in range(N_TOKENS):
                nxt = model(input_ids=ids).logits[0, -1].argmax()
                ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
        return ids[0, len(PROMPT_IDS) :].tolist()

    dirs, expected = {}, {"base": greedy(fresh_base())}
    for name, seed in seeds.items():
        peft_model = get_peft_model(fresh_base(), LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS))
        gen = torch.Generator().manual_seed(seed)
        for pname, p in peft_model.named_parameters():
            if "lora_A" in pname or "lora_B" in pname:
                p.data = torch.randn(p.shape, generator=gen) * 0.3
        dirs[name] = out / name
        peft_model.save_pretrained(dirs[name])
        # What the bundle means offline: the saved adapter applied to a fresh base with plain peft.
        expected[name] = greedy(PeftModel.from_pretrained(fresh_base(), dirs[name]).eval())
    return dirs, expected


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Registry with published bundles, tenants with aliases, and one running vLLM server."""
    from adapterhub_lite.bundles import pack_bundle
    from adapterhub_lite.registry import open_registry
    from adapterhub_lite.serving.supervisor import ServeOptions, VLLMServer
    from adapterhub_lite.tenants import TenantStore

    root = tmp_path_factory.mktemp("serving")
    base = _base_dir()
    seeds = {"bot1": 1, "bot2": 2, "helper": 3, "xtool": 4, "e1": 5, "e2": 6, "e3": 7, "bad": 8, "alien": 9}
    dirs, expected = _make_adapters(base, root / "adapters", seeds)

    other_base = root / "other-base"  # same shapes, one weight changed: another fingerprint
    shutil.copytree(base, other_base)
    _perturb_weights(other_base)

    reg = open_registry(root / "registry")
    refs = {
        "bot1": ("acme", "bot", "1.0.0"),
        "bot2": ("acme", "bot", "2.0.0"),
        "helper": ("globex", "helper", "1.0.0"),
        "xtool": ("initech", "xtool", "1.0.0"),
        "e1": ("acme", "e1", "1.0.0"),
        "e2": ("acme", "e2", "1.0.0"),
        "e3": ("acme", "e3", "1.0.0"),
        "bad": ("acme", "bad", "1.0.0"),
        "alien": ("acme", "alien", "1.0.0"),
    }
    full = {}
    for key, (ns, name, version) in refs.items():
        bundle = pack_bundle(
            dirs[key],
            root / "bundles" / f"{ns}-{name}-{version}",
            namespace=ns,
            name=name,
            version=version,
            base_dir=other_base if key == "alien" else base,
        )
        full[key] = reg.publish(bundle).ref
    _corrupt_blob(reg, root / "bundles" / "acme-bad-1.0.0" / "adapter_model.safetensors")

    store = TenantStore.open(root / "tenants.db")
    keys = {}
    _, keys["acme"] = store.add_tenant("acme", base_access=True)
    _, keys["globex"] = store.add_tenant("globex")
    _, keys["initech"] = store.add_tenant("initech")
    _, keys["limited"] = store.add_tenant("limited", base_access=True, requests_per_minute=6)
    _, keys["revoked"] = store.add_tenant("revoked", base_access=True)
    store.revoke("revoked")
    for alias, key in [
        ("bot", "bot1"),
        ("e1", "e1"),
        ("e2", "e2"),
        ("e3", "e3"),
        ("bad", "bad"),
        ("alien", "alien"),
    ]:
        store.set_alias("acme", alias, full[key])
    store.set_alias("globex", "helper", full["helper"])
    store.set_alias("initech", "xtool", full["xtool"])

    opts = ServeOptions(
        base_dir=str(base),
        served_name="base",
        registry=str(root / "registry"),
        tenants_db=str(root / "tenants.db"),
        cache_dir=str(root / "cache"),
        max_loras=2,
        max_cpu_loras=4,
        max_loaded=3,
        max_lora_rank=16,
        max_model_len=256,
        log_path=str(root / "vllm.log"),
    )
    from adapterhub_lite.settings import env_name

    server = VLLMServer(opts)
    # /health asked for throughout the start, so the 503 while warming up is seen, not inferred: the
    # warm-up is held (ADAPTERHUB_WARMUP_HOLD, a test hook) until the poller has seen that 503.
    release = root / "warm-up-release"
    server.env[env_name("warmup_hold")] = str(release)
    health: list[tuple[int, str]] = []
    started = threading.Event()

    def poll_health() -> None:
        while not started.is_set():
            try:
                # A long timeout: an answer that comes slowly while the engine warms up is still counted.
                r = httpx.get(server.url + "/health", timeout=30.0)
                health.append((r.status_code, r.text))
                if not release.exists():  # released on the 503; on a 200 too, to fail the test, not hang
                    health.append((0, "released" if r.status_code == 503 else "released after a 200"))
                    release.touch()
            except httpx.HTTPError:
                pass  # not listening yet
            time.sleep(0.05)

    poller = threading.Thread(target=poll_health, name="health-poller")
    poller.start()
    try:
        server.start()
    finally:
        started.set()
        poller.join()
    shm: set[str] = set()
    try:
        from adapterhub_lite.serving.supervisor.processes import group_pids, shm_segments

        shm = shm_segments(group_pids(server.process.pid))
        yield {
            "url": server.url,
            "admin": server.admin_key,
            "keys": keys,
            "refs": full,
            "expected": expected,
            "adapter_dirs": dirs,
            "bundles": root / "bundles",
            "base": base,
            "store": store,
            "registry": str(root / "registry"),
            "db": str(root / "tenants.db"),
            "server": server,
            "health": health,
        }
    finally:
        server.stop()
    # A stop in order: vLLM itself released its shared memory (the launcher would remove leftovers,
    # and says so in shm_left), and nothing it mapped is left in /dev/shm.
    assert shm and server.shm_left == [] and not [p for p in shm if Path(p).exists()]


def _perturb_weights(model_dir: Path) -> None:
    from safetensors.torch import load_file, save_file

    path = model_dir / "model.safetensors"
    tensors = load_file(path)
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + 0.01
    path.unlink()
    save_file(tensors, path, metadata={"format": "pt"})


def _corrupt_blob(reg, original: Path) -> None:
    """Flip bytes of a published weights blob, as a broken disk or a tampered store would."""
    sha = hashlib.sha256(original.read_bytes()).hexdigest()
    blob = Path(reg.blobs.path(sha))
    os.chmod(blob, 0o644)
    data = bytearray(blob.read_bytes())
    data[-16:] = bytes(16)
    blob.write_bytes(bytes(data))


def _client(world, tenant: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=world["url"] + "/v1", api_key=world["keys"][tenant], max_retries=0)


def _complete(client: openai.OpenAI, model: str, n: int = N_TOKENS):
    r = client.completions.create(
        model=model,
        prompt=PROMPT_IDS,
        max_tokens=n,
        temperature=0,
        extra_body={"ignore_eos": True, "return_token_ids": True},
    )
    return r, r.choices[0].token_ids


def _post(world, path: str, key: str | None, body: dict) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(world["url"] + path, json=body, headers=headers, timeout=60)


def test_served_tokens_equal_offline_peft_and_differ_from_base(world):
    exp = world["expected"]
    assert len({tuple(v) for v in exp.values()}) == len(exp), "test adapters must be distinguishable"
    r, tokens = _complete(_client(world, "acme"), "bot")
    assert r.model == world["refs"]["bot1"]  # vLLM saw the immutable reference, not the alias
    assert tokens == exp["bot1"]
    _, tokens = _complete(_client(world, "globex"), "helper")
    assert tokens == exp["helper"]
    _, tokens = _complete(_client(world, "acme"), "base")
    assert tokens == exp["base"]
    # a full reference the tenant may read works as well as its alias
    _, tokens = _complete(_client(world, "acme"), world["refs"]["bot2"])
    assert tokens == exp["bot2"]


def test_long_mixed_batches_equal_offline_peft(world):
    """Prefills long enough for the plugin's grouped CPU LoRA ops (>= 128 tokens, several adapters in
    one batch) give the same greedy tokens as peft offline."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    prompts = {
        name: [(7 * i + 31 * k) % 1400 + 3 for i in range(150)] for k, name in enumerate(["e1", "e2", "e3"])
    }
    expected = {}
    for name, ids in prompts.items():
        base = AutoModelForCausalLM.from_pretrained(world["base"], dtype=torch.float32)
        model = PeftModel.from_pretrained(base, world["adapter_dirs"][name]).eval()
        x = torch.tensor([ids])
        with torch.no_grad():
            for _ in range(4):
                x = torch.cat([x, model(input_ids=x).logits[0, -1].argmax().view(1, 1)], dim=1)
        expected[name] = x[0, len(ids) :].tolist()

    client = _client(world, "acme")
    got: dict[str, list[int]] = {}

    def ask(name: str) -> None:
        r = client.completions.create(
            model=world["refs"][name],
            prompt=prompts[name],
            max_tokens=4,
            temperature=0,
            extra_body={"ignore_eos": True, "return_token_ids": True},
        )
        got[name] = r.choices[0].token_ids

    threads = [threading.Thread(target=ask, args=(name,)) for name in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == expected


def test_streaming_chat_and_completion_pass_through(world):
    client = _client(world, "acme")
    whole = client.completions.create(model="bot", prompt="hello", max_tokens=6, temperature=0)
    chunks = client.completions.create(model="bot", prompt="hello", max_tokens=6, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    chat = client.chat.completions.create(
        model="bot", messages=[{"role": "user", "content": "hi"}], max_tokens=4, temperature=0
    )
    assert chat.model == world["refs"]["bot1"] and chat.usage.completion_tokens == 4
    stream = client.chat.completions.create(
        model="bot", messages=[{"role": "user", "content": "hi"}], max_tokens=4, temperature=0, stream=True
    )
    assert (
        "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        == chat.choices[0].message.content
    )


def test_models_list_shows_each_tenant_only_its_own(world):
    acme = {m.id: m for m in _client(world, "acme").models.list()}
    globex = {m.id for m in _client(world, "globex").models.list()}
    aliases = {"base", "bot", "e1", "e2", "e3", "bad", "alien"}
    # Its aliases, then its packages by name; not acme/alien, which is for another base.
    assert set(acme) == aliases | {"acme/bot", "acme/e1", "acme/e2", "acme/e3", "acme/bad"}
    assert acme["acme/bot"].root == world["refs"]["bot2"] and acme["bot"].root == world["refs"]["bot1"]
    assert globex == {"helper", "globex/helper"}  # no base access, nothing of acme's


def test_models_list_shows_adapters_shared_with_a_tenant(world):
    from adapterhub_lite.registry import open_registry

    _, key = world["store"].add_tenant("partner")
    client = openai.OpenAI(base_url=world["url"] + "/v1", api_key=key, max_retries=0)
    assert [m.id for m in client.models.list()] == []
    open_registry(world["registry"]).share("globex/helper", "partner")
    shared = time.monotonic()
    while not (models := {m.id: m for m in client.models.list()}):  # registry answers are reused for 5 s
        assert time.monotonic() - shared < 30, "the share never reached the server"
        time.sleep(0.2)
    assert set(models) == {"globex/helper"} and models["globex/helper"].root == world["refs"]["helper"]
    assert models["globex/helper"].owned_by == "globex"
    assert _complete(client, "globex/helper")[1] == world["expected"]["helper"]


def test_cross_tenant_access_is_denied_on_every_route(world):
    g = world["keys"]["globex"]
    acme_ref = world["refs"]["bot1"]

    def not_found(resp, model):
        assert resp.status_code == 404
        assert resp.json()["error"]["message"] == f"The model `{model}` does not exist."

    for model in [acme_ref, "acme/bot", "bot", "acme/nothing@9.9.9", "base"]:
        not_found(_post(world, "/v1/completions", g, {"model": model, "prompt": "x", "max_tokens": 1}), model)
        not_found(
            _post(
                world, "/v1/completions", g, {"model": model, "prompt": "x", "max_tokens": 1, "stream": True}
            ),
            model,
        )
        chat = {"model": model, "messages": [{"role": "user", "content": "x"}], "max_tokens": 1}
        not_found(_post(world, "/v1/chat/completions", g, chat), model)
    # the same answer whether the model exists for someone else or nowhere
    a = _post(world, "/v1/completions", g, {"model": acme_ref, "prompt": "x"}).json()
    b = _post(world, "/v1/completions", g, {"model": "acme/nothing@9.9.9", "prompt": "x"}).json()
    assert a["error"]["type"] == b["error"]["type"] and set(a) == set(b)

    load = {"lora_name": "stolen", "lora_path": "/tmp"}
    for path, body in [("/v1/load_lora_adapter", load), ("/v1/unload_lora_adapter", {"lora_name": acme_ref})]:
        assert _post(world, path, g, body).status_code == 403
        assert _post(world, path, None, body).status_code == 401
    assert (
        httpx.get(
            world["url"] + "/adapterhub/v1/status", headers={"Authorization": f"Bearer {g}"}
        ).status_code
        == 403
    )
    assert httpx.get(world["url"] + "/metrics", headers={"Authorization": f"Bearer {g}"}).status_code == 403
    assert httpx.get(world["url"] + "/v1/models").status_code == 401
    for bad in ["nope", world["keys"]["revoked"]]:
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=world["url"] + "/v1", api_key=bad, max_retries=0).models.list()


def test_key_rotation_and_revocation_apply_to_the_running_server(world):
    store = world["store"]
    _, key = store.add_tenant("rotor", base_access=True)
    client = openai.OpenAI(base_url=world["url"] + "/v1", api_key=key, max_retries=0)
    assert [m.id for m in client.models.list()] == ["base"]
    new_key = store.rotate_key("rotor")
    with pytest.raises(openai.AuthenticationError):
        client.models.list()
    client = openai.OpenAI(base_url=world["url"] + "/v1", api_key=new_key, max_retries=0)
    assert client.completions.create(model="base", prompt="x", max_tokens=1).choices
    store.revoke("rotor")
    with pytest.raises(openai.AuthenticationError):
        client.completions.create(model="base", prompt="x", max_tokens=1)


def test_admin_can_load_and_unload(world):
    """An admin loads a published bundle's folder under a name of its own (whatever ran before: the
    folder is the packed bundle, not an entry of the disk cache) and it serves that adapter."""
    admin = world["admin"]
    path = world["bundles"] / "acme-e2-1.0.0"
    body = {"lora_name": "admin-probe", "lora_path": str(path)}
    assert _post(world, "/v1/load_lora_adapter", admin, body).status_code == 200
    try:
        r = _post(
            world,
            "/v1/completions",
            admin,
            {
                "model": "admin-probe",
                "prompt": PROMPT_IDS,
                "max_tokens": N_TOKENS,
                "temperature": 0,
                "ignore_eos": True,
                "return_token_ids": True,
            },
        )
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["token_ids"] == world["expected"]["e2"]
    finally:
        assert _post(world, "/v1/unload_lora_adapter", admin, {"lora_name": "admin-probe"}).status_code == 200


def test_bad_bundles_get_clear_errors_while_others_are_served(world):
    client = _client(world, "acme")
    # A blob the registry finds corrupt is damage to the store (the registry's kind INTERNAL: 500, not
    # the client's 422); a bundle that fails verification against this server is refused with 422.
    with pytest.raises(openai.InternalServerError) as bad:
        _complete(client, "bad")
    assert "acme/bad@1.0.0" in str(bad.value) and "corrupt" in str(bad.value)
    with pytest.raises(openai.UnprocessableEntityError) as alien:
        _complete(client, "alien")
    assert "other-base" in str(alien.value) and "not on this base" in str(alien.value)
    _, tokens = _complete(client, "bot")
    assert tokens == world["expected"]["bot1"]
    status = httpx.get(
        world["url"] + "/adapterhub/v1/status", headers={"Authorization": f"Bearer {world['admin']}"}
    )
    assert not any(n.endswith(("bad@1.0.0", "alien@1.0.0")) for n in status.json()["loaded"])


def test_eviction_keeps_the_hot_set_and_reloads_on_demand(world):
    client = _client(world, "acme")
    admin = {"Authorization": f"Bearer {world['admin']}"}
    for alias, key in [("e1", "e1"), ("e2", "e2"), ("e3", "e3"), ("bot", "bot1")]:
        _, tokens = _complete(client, alias, n=2)
        assert tokens == world["expected"][key][:2]
    loaded = httpx.get(world["url"] + "/adapterhub/v1/status", headers=admin).json()["loaded"]
    assert len(loaded) <= 3 and world["refs"]["e1"] not in loaded  # the coldest went
    _, tokens = _complete(client, "e1")  # comes back on demand, same weights
    assert tokens == world["expected"]["e1"]
    assert (
        world["refs"]["e1"]
        in httpx.get(world["url"] + "/adapterhub/v1/status", headers=admin).json()["loaded"]
    )


def test_hot_swap_under_load_never_serves_a_wrong_adapter(world):
    from cli.main import app

    refs, exp = world["refs"], world["expected"]
    v1, v2 = refs["bot1"], refs["bot2"]
    by_ref = {v1: exp["bot1"], v2: exp["bot2"], refs["helper"]: exp["helper"], refs["xtool"]: exp["xtool"]}
    allowed = {"acme": {v1, v2}, "globex": {refs["helper"]}, "initech": {refs["xtool"]}}
    models = {"acme": "bot", "globex": "helper", "initech": "xtool"}
    results: list[tuple[str, str, list[int] | None, int]] = []
    stop = threading.Event()

    def tenant_loop(tenant: str) -> None:
        client = _client(world, tenant)
        while not stop.is_set():
            try:
                r, tokens = _complete(client, models[tenant], n=4)
                results.append((tenant, r.model, tokens, 200))
            except openai.APIStatusError as exc:
                results.append((tenant, "", None, exc.status_code))

    runner = CliRunner()
    args = ["--db", world["db"], "--registry", world["registry"]]

    def promote(ref: str) -> None:
        out = runner.invoke(app, ["tenant", "promote", "acme", "bot", ref, *args])
        assert out.exit_code == 0, out.output

    # A request in flight on v1 finishes on v1 although the alias moves under it; the next one gets v2.
    client = _client(world, "acme")
    reference = client.completions.create(model="bot", prompt=PROMPT_IDS, max_tokens=32, temperature=0)
    stream = client.completions.create(
        model="bot",
        prompt=PROMPT_IDS,
        max_tokens=32,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    chunks = [next(iter(stream))]  # admitted and generating
    promote(v2)
    t0 = time.monotonic()
    r, tokens = _complete(client, "bot", n=1)
    swap_seconds = time.monotonic() - t0
    chunks += list(stream)
    assert {c.model for c in chunks} == {v1}
    assert "".join(c.choices[0].text for c in chunks if c.choices) == reference.choices[0].text
    assert r.model == v2 and tokens == exp["bot2"][:1] and swap_seconds < 10

    # Then promote and roll back repeatedly while three tenants send requests continuously. Between
    # two moves, wait for answers (not for the clock): each version is asked for under load, however
    # slow the machine is.
    threads = [threading.Thread(target=tenant_loop, args=(t,)) for t in models]

    def answers_after(n: int, count: int = 3) -> None:
        deadline = time.monotonic() + 300
        while sum(1 for r in results[n:] if r[0] == "acme") < count:
            assert time.monotonic() < deadline and any(t.is_alive() for t in threads), "no answers"
            time.sleep(0.05)

    for t in threads:
        t.start()
    try:
        for i in range(6):
            answers_after(len(results))
            promote(v1 if i % 2 == 0 else v2)
        answers_after(len(results))
    finally:
        stop.set()
        for t in threads:
            t.join()

    assert not [r for r in results if r[3] >= 500], "5xx during hot swap"
    assert all(r[3] == 200 for r in results)
    wrong = [r for r in results if r[1] not in allowed[r[0]] or r[2] != by_ref[r[1]][:4]]
    assert not wrong, f"wrong adapter served: {wrong[:3]}"
    served = {r[1] for r in results if r[0] == "acme"}
    assert served == {v1, v2}, "both versions should have been served during the swaps"
    # the last promote (to v2) is what the next request gets
    try:
        r, _ = _complete(_client(world, "acme"), "bot", n=1)
        assert r.model == v2
    finally:
        promote(v1)  # as the other tests expect the alias, whatever order they run in


def _metric(world, name: str, tenant: str) -> float:
    text = httpx.get(world["url"] + "/metrics", headers={"Authorization": f"Bearer {world['admin']}"}).text
    prefix = f'{name}{{adapter="",tenant="{tenant}"}} '
    return sum(float(line[len(prefix) :]) for line in text.splitlines() if line.startswith(prefix))


def test_streams_are_metered_exactly_and_clients_get_what_they_asked(world):
    _, key = world["store"].add_tenant("meter", base_access=True)
    client = openai.OpenAI(base_url=world["url"] + "/v1", api_key=key, max_retries=0)
    ask = dict(model="base", prompt=PROMPT_IDS, max_tokens=5, stream=True, extra_body={"ignore_eos": True})
    # Without include_usage the client sees no usage event (as vLLM alone answers), yet all is counted.
    chunks = list(client.completions.create(**ask))
    assert all(c.choices and c.usage is None for c in chunks)
    assert _metric(world, "adapterhub_prompt_tokens_total", "meter") == len(PROMPT_IDS)
    assert _metric(world, "adapterhub_completion_tokens_total", "meter") == 5
    # With include_usage it gets the usage event, as asked.
    chunks = list(client.completions.create(**ask, stream_options={"include_usage": True}))
    assert chunks[-1].usage.completion_tokens == 5 and not chunks[-1].choices
    assert _metric(world, "adapterhub_completion_tokens_total", "meter") == 10


def test_rate_limit_returns_429_then_recovers(world):
    client = _client(world, "limited")
    start = time.monotonic()
    for _ in range(6):
        client.completions.create(model="base", prompt="x", max_tokens=1)
    with pytest.raises(openai.RateLimitError) as exc:
        client.completions.create(model="base", prompt="x", max_tokens=1)
    elapsed = time.monotonic() - start
    wait = int(exc.value.response.headers["retry-after"])
    # 6 a minute refills one request every 10 s; emptied `elapsed` seconds after it was full, the bucket
    # holds at most elapsed/10 of a request: the wait is 10 - elapsed rounded up, never more than 10.
    assert 10 - elapsed <= wait <= 10, (wait, elapsed)
    time.sleep(wait)
    assert client.completions.create(model="base", prompt="x", max_tokens=1).choices


def test_metrics_count_per_tenant_and_adapter(world):
    # Its own traffic, so the test holds alone: one adapter request, one base request, one refusal.
    _complete(_client(world, "globex"), "helper", n=1)
    _complete(_client(world, "acme"), "base", n=1)
    _, key = world["store"].add_tenant("counted", base_access=True, requests_per_minute=1)
    counted = openai.OpenAI(base_url=world["url"] + "/v1", api_key=key, max_retries=0)
    counted.completions.create(model="base", prompt="x", max_tokens=1)
    with pytest.raises(openai.RateLimitError):
        counted.completions.create(model="base", prompt="x", max_tokens=1)
    text = httpx.get(world["url"] + "/metrics", headers={"Authorization": f"Bearer {world['admin']}"}).text
    ref = world["refs"]["helper"]
    assert f'adapterhub_requests_total{{adapter="{ref}",status="200",tenant="globex"}}' in text
    assert 'adapterhub_completion_tokens_total{adapter="",tenant="acme"}' in text
    assert 'adapterhub_rejected_total{reason="rate_limited",tenant="counted"} 1.0' in text
    assert "vllm:" in text  # vLLM's own metrics are on the same page


def _counters(world) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every adapterhub_* counter sample on /metrics, by (sample name, sorted labels)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(world["url"] + "/metrics", headers={"Authorization": f"Bearer {world['admin']}"}).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        if family.name.startswith("adapterhub_")
        for s in family.samples
        if s.name.endswith("_total")
    }


def _delta(before: dict, after: dict, name: str, **labels: str) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


def test_adapter_loads_evictions_and_errors_are_counted_exactly(world):
    """Adapter loads, evictions and errors read back as values, one request at a time: a load is
    counted once (not again while the adapter stays loaded), each adapter pushed out of the hot set
    (3 slots) adds exactly one eviction under its own name, and a corrupt adapter one error of kind
    `internal` and no load."""
    refs, exp = world["refs"], world["expected"]
    admin = {"Authorization": f"Bearer {world['admin']}"}
    client = _client(world, "acme")

    def loaded() -> set[str]:
        status = httpx.get(world["url"] + "/adapterhub/v1/status", headers=admin, timeout=30)
        return set(status.json()["loaded"])

    for name in ["e1", "e2", "e3", "bot1", "bot2", "e1", "e1", "bot2"]:
        ref = refs[name]
        held, before = loaded(), _counters(world)
        assert _complete(client, ref, n=2)[1] == exp[name][:2]
        now, after = loaded(), _counters(world)
        assert ref in now and len(now) <= 3, now
        assert _delta(before, after, "adapterhub_adapter_loads_total", adapter=ref) == (ref not in held), name
        for gone in held - now:  # pushed out to make room: one eviction each, under its own name
            assert _delta(before, after, "adapterhub_adapter_evictions_total", adapter=gone) == 1, gone
        total = sum(v for (n, _), v in after.items() if n == "adapterhub_adapter_evictions_total")
        total -= sum(v for (n, _), v in before.items() if n == "adapterhub_adapter_evictions_total")
        assert total == len(held - now), (name, held, now)
    before = _counters(world)
    with pytest.raises(openai.InternalServerError):
        _complete(client, "bad")
    after = _counters(world)
    bad = refs["bad"]
    errors = _delta(before, after, "adapterhub_errors_total", tenant="acme", adapter=bad, reason="internal")
    assert errors == 1
    assert _delta(before, after, "adapterhub_adapter_loads_total", adapter=bad) == 0


def test_hot_set_bound_holds_while_tenants_churn_adapters(world):
    """Five adapters for three slots, asked for concurrently: vLLM never holds more than --max-loaded
    (sampled throughout), and every answer is the adapter's own."""
    refs, exp = world["refs"], world["expected"]
    names = ["e1", "e2", "e3", "bot1", "bot2"]
    admin = {"Authorization": f"Bearer {world['admin']}"}
    stop = threading.Event()
    loaded_max = [0]
    results: list[tuple[str, list[int] | None]] = []

    def sampler() -> None:
        while not stop.is_set():
            status = httpx.get(world["url"] + "/adapterhub/v1/status", headers=admin, timeout=30).json()
            loaded_max[0] = max(loaded_max[0], len(status["loaded"]))
            time.sleep(0.05)

    def client(i: int) -> None:
        c = _client(world, "acme")
        for k in range(6):
            name = names[(i + k) % len(names)]
            try:
                results.append((name, _complete(c, refs[name], n=2)[1]))
            except openai.APIStatusError as exc:
                results.append((name, [exc.status_code]))

    watcher = threading.Thread(target=sampler)
    watcher.start()
    clients = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    for t in clients:
        t.start()
    for t in clients:
        t.join()
    stop.set()
    watcher.join()
    assert loaded_max[0] <= 3
    assert [r for r in results if r[1] != exp[r[0]][:2]] == []
    # Every folder handed to vLLM was reported read by vLLM's API server (lora_handoff), so no disk
    # cache entry stays leased after the loads: the pins ended with the reads, not by their timer.
    status = httpx.get(world["url"] + "/adapterhub/v1/status", headers=admin, timeout=30).json()
    assert status["handed_out"] == 0
    assert status["cache_bytes"] <= status["cache_max_bytes"]
    # vLLM's lora_requests_info keeps only its current sample, however many combinations went by
    text = httpx.get(world["url"] + "/metrics", headers=admin).text
    assert sum(1 for line in text.splitlines() if line.startswith("vllm:lora_requests_info{")) <= 1


def test_health_is_503_while_warming_up_then_200(world):
    """Requested while the server started: /health answered 503 "warming up" while
    the warm-up was held (the fixture's ADAPTERHUB_WARMUP_HOLD), and 200 only after the poller released
    it; never back to 503."""
    health = world["health"]
    assert (0, "released") in health, f"never a 503 while warming up: {health}"
    released = health.index((0, "released"))
    before, after = [s for s, _ in health[:released]], [s for s, _ in health[released + 1 :]]
    assert before and all(s == 503 for s in before), before  # not listening, then 503 while warming
    assert all("warming up" in text for status, text in health[:released])
    first_ok = after.index(200) if 200 in after else len(after)  # start() may return before a poll
    assert all(s == 503 for s in after[:first_ok]) and all(s == 200 for s in after[first_ok:]), after
    assert httpx.get(world["url"] + "/health", timeout=10).status_code == 200


def test_ready_only_after_the_lora_warm_up(world):
    status = httpx.get(
        world["url"] + "/adapterhub/v1/status", headers={"Authorization": f"Bearer {world['admin']}"}
    ).json()
    assert status["ready"] is True
    server = world["server"]
    assert "warm-up" in server.phases and server.phases["total"] >= server.phases["warm-up"] > 0
    log = server.log_tail(100000)
    assert "warm-up done" in log and "warm-up failed" not in log and "warm-up request failed" not in log
    # the warm-up adapter is gone and no tenant can name it
    assert "adapterhub-warmup" not in status["loaded"]
    with pytest.raises(openai.NotFoundError):
        _complete(_client(world, "acme"), "adapterhub-warmup")
