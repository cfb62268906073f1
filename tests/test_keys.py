"""The one keys module: minting, storing, parsing and checking bearer secrets."""

from __future__ import annotations

import pytest

from adapterhub_lite import keys


def test_minted_secrets_are_unique_prefixed_and_parse_back():
    minted = {keys.mint("ahk_") for _ in range(200)}
    assert len(minted) == 200
    for secret in minted:
        assert secret.startswith("ahk_") and len(secret) == 4 + 43
        assert keys.bearer(f"Bearer {secret}") == secret
        assert keys.bearer(f"bearer  {secret} ".encode()) == secret


def test_only_the_digest_is_stored_and_it_matches_only_its_secret():
    secret = keys.mint("ahk_")
    stored = keys.digest(secret)
    assert secret not in stored and len(stored) == 64
    assert keys.matches(secret, stored)
    assert not keys.matches(secret + "x", stored) and not keys.matches(secret[:-1], stored)
    assert keys.same(secret, secret) and not keys.same(secret, secret.upper())


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "Bearer",
        "Bearer ",
        "Basic dXNlcjpwYXNz",
        "Token ahk_abc",
        "Bearer ahk_abc\n",
        "Bearer ahk_a\x1b]0;pwned\x07",
        "Bearer ahk_abc, Bearer other",
        "Bearer ahk_ä",
        "Bearer " + "a" * (keys.MAX_SECRET_CHARS + 10),
    ],
)
def test_anything_but_one_bearer_secret_is_no_key(header):
    assert keys.bearer(header) is None


def test_a_listing_shows_too_little_to_guess():
    secret = keys.mint("ahk_")
    hint = keys.shown(secret, "ahk_")
    assert hint.endswith("...") and len(hint) == len("ahk_") + 4 + 3 and secret.startswith(hint[:-3])
