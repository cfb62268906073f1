"""Module-name patterns from `adapter_config.json`, matched as peft matches them, at a bounded cost.

peft and vLLM treat `rank_pattern`/`alpha_pattern` keys and a string `target_modules` (also
`exclude_modules`) as regular expressions for Python's backtracking engines (`re`, `regex`): a hostile
key such as `(a+)+b` costs seconds per module name, doubling per character, and it would cost that
again in every peft and vLLM process that later loads the adapter. So checking them with a safe
matcher of our own would not be enough: the key itself has to be safe for a backtracking engine.

Decision: accept the forms peft documents (module names and dotted suffixes, `^`-anchored paths) and the
regular-expression forms people write for module names (`.`, escapes such as `\\.` and `\\d`, character
classes, groups, alternation, anchors), with at most `MAX_QUANTIFIERS` quantifiers (`*`, `+`, `?`,
`{m,n}`), each on a single character or class, never on a group: the backtracking cost of such a pattern
is polynomial, O(n^(q+1)) for q quantifiers over a name of n <= `MAX_NAME_CHARS` characters, not
exponential. Backreferences, lookarounds, conditionals, atomic groups, possessive quantifiers and inline
flags are refused; so are keys over `MAX_PATTERN_CHARS` or with non-printable characters. What passes is
matched with `re`, with exactly peft's expressions, so our verdict is peft's verdict.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from typing import Any

try:  # the parser `re` itself uses: keys are parsed exactly as peft's re.match will parse them
    import re._constants as _c  # type: ignore[import-not-found]
    import re._parser as _sre  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover - Python < 3.11
    import sre_constants as _c  # type: ignore[no-redef]
    import sre_parse as _sre  # type: ignore[no-redef]

from adapterhub_lite.errors import BundleError

MAX_PATTERN_CHARS = 256
MAX_PATTERNS = 512
MAX_QUANTIFIERS = 3
MAX_NAME_CHARS = 256
_HINT = (
    "write module-name patterns as peft documents them: a module name or dotted suffix such as "
    "'q_proj' or 'layers.0.self_attn.q_proj', or a simple regex such as 'layers\\.\\d+\\.mlp' "
    "(no nested or group quantifiers, backreferences or lookarounds)"
)
_CHAR_OPS = {_c.LITERAL, _c.NOT_LITERAL, _c.ANY, _c.IN}
_OK_AT = {_c.AT_BEGINNING, _c.AT_END, _c.AT_BEGINNING_STRING, _c.AT_END_STRING}


def _walk(tree: Any, label: str, counter: list[int]) -> None:
    for op, arg in tree:
        if op in _CHAR_OPS:
            continue
        if op is _c.AT and arg in _OK_AT:
            continue
        if op is _c.BRANCH:
            for alt in arg[1]:
                _walk(alt, label, counter)
        elif op is _c.SUBPATTERN:
            _group, add_flags, del_flags, body = arg
            if add_flags or del_flags:
                raise BundleError(f"{label}: inline regex flags are not accepted", hint=_HINT)
            _walk(body, label, counter)
        elif op in (_c.MAX_REPEAT, _c.MIN_REPEAT):
            _lo, _hi, body = arg
            if len(body) != 1 or body[0][0] not in _CHAR_OPS:
                raise BundleError(
                    f"{label}: a quantifier on a group (exponential matching cost, as in '(a+)+')",
                    hint=_HINT,
                )
            counter[0] += 1
        else:
            what = str(op).lower().replace("_", " ")
            raise BundleError(
                f"{label}: regex feature '{what}' is not accepted in a module pattern", hint=_HINT
            )


def check_pattern(pattern: object, label: str) -> str:
    """Refuse a module-name pattern that is not a short, valid regex of the safe forms; return it."""
    if not isinstance(pattern, str) or not pattern:
        raise BundleError(
            f"{label}: a pattern must be a non-empty string, got {type(pattern).__name__}", hint=_HINT
        )
    if len(pattern) > MAX_PATTERN_CHARS:
        raise BundleError(
            f"{label}: pattern is {len(pattern)} characters, over {MAX_PATTERN_CHARS}", hint=_HINT
        )
    if not pattern.isascii() or not pattern.isprintable():
        raise BundleError(
            f"{label}: pattern {pattern!r} holds non-printable or non-ASCII characters", hint=_HINT
        )
    try:
        state = _sre.parse(pattern)
    except (re.error, OverflowError, RecursionError) as exc:
        raise BundleError(f"{label}: pattern {pattern!r} is not a valid regex ({exc})", hint=_HINT) from None
    if state.state.flags & ~(_c.SRE_FLAG_UNICODE):
        raise BundleError(f"{label}: inline regex flags are not accepted", hint=_HINT)
    counter = [0]
    _walk(state, label, counter)
    if counter[0] > MAX_QUANTIFIERS:
        raise BundleError(
            f"{label}: pattern {pattern!r} has {counter[0]} quantifiers, over {MAX_QUANTIFIERS}", hint=_HINT
        )
    return pattern


def check_name(name: str, label: str) -> str:
    """Module names matched against patterns are bounded too (the cost is polynomial in their length)."""
    if len(name) > MAX_NAME_CHARS or not name.isascii() or not name.isprintable():
        raise BundleError(
            f"{label}: module name {name[:80]!r} is over {MAX_NAME_CHARS} characters or not printable ASCII",
            hint="re-save the adapter with `model.save_pretrained(dir)` and pack it again",
        )
    return name


@functools.lru_cache(maxsize=1024)
def _suffix_re(key: str) -> re.Pattern[str]:
    return re.compile(rf"(.*\.)?({key})$")


@functools.lru_cache(maxsize=256)
def _full_re(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


def pattern_value(patterns: dict[str, Any], module: str) -> Any | None:
    """The value of the first key matching `module` as peft's `get_pattern_key` matches it, else None.

    Keys must have passed `check_patterns`; the result equals peft's and vLLM's (first match wins).
    """
    for key, value in patterns.items():
        if _suffix_re(key).match(module):
            return value
    return None


def check_patterns(mapping: object, label: str, *, integer: bool) -> dict[str, int | float]:
    """Validate a rank_pattern/alpha_pattern: an object of safe pattern -> positive (integer) number."""
    if mapping is None:
        return {}
    if not isinstance(mapping, dict):
        raise BundleError(
            f"{label}: must be an object mapping module patterns to numbers, got {type(mapping).__name__}",
            hint=_HINT,
        )
    if len(mapping) > MAX_PATTERNS:
        raise BundleError(f"{label}: {len(mapping)} patterns, over the limit of {MAX_PATTERNS}", hint=_HINT)
    for key, value in mapping.items():
        check_pattern(key, f"{label} key {key[:40]!r}")
        ok = type(value) is int if integer else type(value) in (int, float)
        if not ok or not value > 0 or value != value or value in (float("inf"),):
            kind = "a positive integer" if integer else "a positive number"
            raise BundleError(f"{label}[{key[:40]!r}]: must be {kind}, got {value!r}", hint=_HINT)
    return mapping


def check_targets(value: object, label: str, *, allow_none: bool = False) -> str | list[str] | None:
    """Validate target_modules/exclude_modules: a safe regex string, or a list of module names."""
    if value is None:
        if allow_none:
            return None
        raise BundleError(f"{label}: is missing", hint="set target_modules, e.g. ['q_proj', 'v_proj']")
    if isinstance(value, str):
        if value == "all-linear":
            return value
        return check_pattern(value, label)
    if isinstance(value, list) and len(value) <= MAX_PATTERNS:
        for item in value:
            if not isinstance(item, str) or not item or len(item) > MAX_NAME_CHARS or not item.isprintable():
                raise BundleError(
                    f"{label}: every entry must be a module name (1-{MAX_NAME_CHARS} printable characters), "
                    f"got {item!r:.60}",
                    hint="list module names such as ['q_proj', 'v_proj']",
                )
        return value
    raise BundleError(
        f"{label}: must be a module name list or one regex string (at most {MAX_PATTERNS} entries), "
        f"got {type(value).__name__}",
        hint="list module names such as ['q_proj', 'v_proj']",
    )


def targeted(config: dict[str, Any], module: str) -> bool:
    """Whether peft's `check_target_module_exists` would adapt `module` (config already validated).

    `all-linear` is resolved by peft against the model's layer types, so any module passes it here;
    modules_to_save is refused elsewhere. layers_to_transform narrows a list target to some layers.
    """
    excluded = config.get("exclude_modules")
    if isinstance(excluded, str) and _full_re(excluded).fullmatch(module):
        return False
    if isinstance(excluded, list) and any(module == e or module.endswith("." + e) for e in excluded):
        return False
    targets = config.get("target_modules")
    if targets == "all-linear":
        return True
    if isinstance(targets, str):
        return _full_re(targets).fullmatch(module) is not None
    if module in targets:
        return True
    if not any(module.endswith("." + t) for t in targets):
        return False
    layers = config.get("layers_to_transform")
    if layers is None or layers == []:
        return True
    index = _layer_index(module, config.get("layers_pattern"))
    if index is None:
        return False
    return index == layers if isinstance(layers, int) else index in layers


def _layer_index(module: str, layers_pattern: str | list[str] | None) -> int | None:
    # peft's own expressions; layers_pattern entries are validated by check_layers as plain names.
    if not layers_pattern:
        m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", module)
    else:
        m = None
        for p in [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern:
            m = re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", module)
            if m:
                break
    return int(m.group("idx")) if m else None


def check_layers(config: dict[str, Any], label: str) -> None:
    """layers_to_transform: an int or a list of ints; layers_pattern: a plain name or list of them."""
    layers = config.get("layers_to_transform")
    if layers is not None and not (
        type(layers) is int
        or (isinstance(layers, list) and len(layers) <= 4096 and all(type(x) is int for x in layers))
    ):
        raise BundleError(
            f"{label}: layers_to_transform must be an integer or a list of integers", hint=_HINT
        )
    pattern = config.get("layers_pattern")
    items: Iterable[object] = [pattern] if isinstance(pattern, str) else pattern or []
    if not isinstance(items, list | tuple) or not all(
        isinstance(p, str) and re.fullmatch(r"[A-Za-z0-9_]{1,64}", p) for p in items
    ):
        raise BundleError(f"{label}: layers_pattern must be a layer-list name such as 'layers'", hint=_HINT)
