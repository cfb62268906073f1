"""Every bearer secret, one way: tenant keys, admin keys and hub tokens are minted, stored, parsed and
checked here.

A secret is a kind prefix (`ahk_` tenant key, `ahub_<id>_` hub token) followed by 256 random bits in
URL-safe base64. Only its SHA-256 is stored: slow password hashes exist to protect low-entropy secrets
against guessing, and 256 random bits cannot be guessed. Comparisons run in constant time. An
`Authorization` header is parsed once, bounded in length and matched whole against the bearer grammar,
so a header that is too long, has a second scheme or carries control characters is simply no key.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets

# Long enough for every secret minted here (prefix + id + 43 characters) with room to spare; a longer
# header is refused before any lookup.
MAX_SECRET_CHARS = 256
# RFC 6750's b64token, which every secret minted here satisfies.
_TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
_SCHEME = "bearer "


def mint(prefix: str) -> str:
    """A fresh secret: `prefix` + 256 random bits, URL-safe."""
    return prefix + secrets.token_urlsafe(32)


def new_id(nbytes: int = 6) -> str:
    """A short public identifier for a stored secret (shown in listings, used to revoke it)."""
    return secrets.token_hex(nbytes)


def digest(secret: str) -> str:
    """The stored form of a secret (hex SHA-256)."""
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def matches(secret: str, stored_digest: str) -> bool:
    """Whether `secret` is the one `stored_digest` was made from (constant time)."""
    return hmac.compare_digest(digest(secret), stored_digest)


def same(given: str | bytes, expected: str | bytes) -> bool:
    """Constant-time equality of two secrets held in the clear (an admin key from the environment)."""
    a = given.encode("utf-8") if isinstance(given, str) else given
    b = expected.encode("utf-8") if isinstance(expected, str) else expected
    return hmac.compare_digest(a, b)


def shown(secret: str, prefix: str) -> str:
    """Enough of a secret to tell it apart in a listing, far too little to guess the rest."""
    return secret[: len(prefix) + 4] + "..."


def bearer(authorization: str | bytes | None) -> str | None:
    """The secret of an `Authorization: Bearer <secret>` header value; None when there is none or the
    value is not exactly that (another scheme, too long, characters outside the bearer grammar)."""
    if authorization is None:
        return None
    if isinstance(authorization, bytes):
        authorization = authorization.decode("latin-1")
    if len(authorization) > len(_SCHEME) + MAX_SECRET_CHARS + 2:
        return None
    if authorization[: len(_SCHEME)].lower() != _SCHEME:
        return None
    secret = authorization[len(_SCHEME) :].strip(" ")
    return secret if _TOKEN.fullmatch(secret) else None
