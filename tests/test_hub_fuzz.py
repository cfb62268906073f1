"""Schemathesis against a real `adapterhub hub serve`, from the OpenAPI document the hub serves: every
operation with generated parameters and bodies, anonymously, with a read token of another namespace and
with an admin token. No answer is a 500, every answer matches the document, and nothing private reaches
a caller who may not read it (slow: about a minute)."""

from __future__ import annotations

import pytest
import schemathesis
from hub_fixtures import served_hub
from hypothesis import HealthCheck, given, settings
from schemathesis import checks

from adapterhub_lite.bundles import pack_bundle
from adapterhub_lite.registry import wire

pytestmark = pytest.mark.slow

# An upload's body is bytes, as for application/octet-stream.
schemathesis.serializer.alias("application/x-tar", "application/octet-stream")
_SECRET: dict[str, str] = {}  # the private adapter's ref and digest
_NOT_READERS: set[str] = set()  # authorization headers of callers who may not read it


@pytest.fixture(scope="module")
def fuzz_hub(lora_dir, tiny_base, tmp_path_factory):
    from adapterhub_lite.hub import token_store
    from adapterhub_lite.registry.remote import RemoteRegistry

    root = tmp_path_factory.mktemp("hub-fuzz")
    registry = root / "registry"
    registry.mkdir()
    store = token_store(registry)
    tokens = {
        "acme": store.create("acme", "publish")[0],
        "globex": store.create("globex", "read")[0],
        "admin": store.create("ops", "admin")[0],
    }
    with served_hub(registry) as (url, _):
        for ns, name, token in (("acme", "secret", "acme"), ("globex", "bot", "admin")):
            bundle = pack_bundle(
                lora_dir,
                root / f"{name}.tar",
                namespace=ns,
                name=name,
                version="1.0.0",
                base_dir=tiny_base,
                archive=True,
                vllm_check=False,
            )
            client = RemoteRegistry(url, token=tokens[token])
            p = client.publish(bundle)
            if name == "secret":
                _SECRET.update(ref=p.ref, digest=p.digest)
            else:
                client.set_public(p.ref)
            client.close()
        _NOT_READERS.update({"", f"Bearer {tokens['globex']}"})
        yield url, tokens


@pytest.fixture(scope="module")
def hub_schema(fuzz_hub):
    url, _ = fuzz_hub
    return schemathesis.openapi.from_url(url + wire.OPENAPI.path)


@schemathesis.check
def nothing_private(ctx, response, case) -> bool | None:
    """A caller who may not read the private adapter never sees its digest, nor its ref in an answer
    that is not a refusal (a 404 repeats the ref the caller typed, nothing more)."""
    if response.request.headers.get("authorization", "") in _NOT_READERS:
        text = response.content.decode("utf-8", "replace")
        shown = {_SECRET["digest"]} | ({_SECRET["ref"]} if response.status_code < 400 else set())
        leaked = [s for s in shown if s in text]
        assert not leaked, f"{leaked} shown to a caller who may not read it"
    return None


_CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_schema_conformance,
    nothing_private,
]


def _aim_at_the_secret(case) -> bool:
    """Point a generated read at the private adapter (random refs almost never name it); False for
    operations that change something or name no adapter."""
    if case.method.upper() != "GET":
        return False
    if case.query and "ref" in case.query:
        case.query = {**case.query, "ref": "acme/secret@1.0.0" if "@" in case.query["ref"] else "acme/secret"}
        return True
    if case.path_parameters and "version" in case.path_parameters:
        case.path_parameters = {
            **case.path_parameters,
            "namespace": "acme",
            "name": "secret",
            "version": "1.0.0",
        }
        return True
    if case.query and "namespace" in case.query:
        case.query = {**case.query, "namespace": "acme"}
        return True
    return False


_SETTINGS = settings(
    max_examples=25,
    deadline=None,
    derandomize=True,  # the same requests on every run: a failure here is reproducible
    suppress_health_check=list(HealthCheck),
    database=None,
)


def test_every_operation_holds_under_generated_requests(hub_schema, fuzz_hub):
    # Each operation in turn through hypothesis (schemathesis' pytest plug-in predates this pytest).
    url, tokens = fuzz_hub
    failures: dict[str, str] = {}
    operations = [result.ok() for result in hub_schema.get_all_operations()]
    assert len(operations) >= 14, [op.label for op in operations]
    for op in operations:

        @given(case=op.as_strategy())
        @_SETTINGS
        def run(case) -> None:
            for aimed in (False, True):
                if aimed and not _aim_at_the_secret(case):
                    break
                for auth in (None, tokens["globex"], tokens["admin"]):
                    headers = {"authorization": f"Bearer {auth}"} if auth else {}
                    case.call_and_validate(base_url=url, headers=headers, checks=_CHECKS)

        try:
            run()
        except Exception as exc:  # every operation's first failure, not only the first operation's
            failures[op.label] = str(exc)[:2000]
    assert not failures, "\n\n".join(f"{k}:\n{v}" for k, v in failures.items())
