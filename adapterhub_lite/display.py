"""Strings from outside (a bundle, a registry row, a request) made safe to show on a terminal or in a log.

A bundle can carry any text in its manifest, card or file names. Printed raw, control characters could
clear the screen, set the window title, move the cursor to overwrite a line, or reorder text with bidi
overrides so that a fake "VERIFIED" appears. `safe()` keeps printable text as it is and shows everything
else as a visible escape, so what the user reads is what the bundle says. `--json` output does not go
through here: JSON encoding escapes control characters itself.
"""

from __future__ import annotations

import unicodedata

# Bidi embedding/override/isolate controls and marks: they reorder what follows them on screen.
_BIDI = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
DEFAULT_MAX_CHARS = 200


def _escape(ch: str) -> str:
    code = ord(ch)
    if code <= 0xFF:
        return f"\\x{code:02x}"
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def _unsafe(ch: str) -> bool:
    if ch in _BIDI:
        return True
    # Cc: C0 and C1 controls (ESC, BEL, CR, DEL...); Cf: other invisible format characters
    # (zero-width joiners, BOM); Zl/Zp: line and paragraph separators; Cs/Co/Cn: not text at all.
    return unicodedata.category(ch) in {"Cc", "Cf", "Zl", "Zp", "Cs", "Co", "Cn"}


def safe(value: object, max_chars: int | None = DEFAULT_MAX_CHARS) -> str:
    """`value` as one printable line: control, format and bidi characters escaped, length bounded.

    A backslash is doubled so an escape in the output cannot be mistaken for one the input spelled out.
    """
    text = value if isinstance(value, str) else str(value)
    clipped = max_chars is not None and len(text) > max_chars
    if clipped:
        text = text[:max_chars]
    out = "".join(
        "\\\\" if ch == "\\" else _escape(ch) if _unsafe(ch) else ch for ch in text
    )
    return out + "…" if clipped else out


def safe_block(value: object, max_chars: int | None = None) -> str:
    """Like `safe`, but keeps newlines and tabs (for multi-line text such as an adapter card)."""
    text = value if isinstance(value, str) else str(value)
    return "\n".join(
        "\t".join(safe(part, None) for part in line.split("\t")) for line in text.split("\n")
    )[: max_chars or None]
