"""MLflow keys from free-text names (condition names, method names): one rule for every stage.

A condition name comes from a researcher's label file and can hold anything (`Effusion (left)`,
`Pleural effusion/thickening`, `Ödem`, `Mass` next to `mass`). MLflow refuses metric, param and tag keys
with other characters than letters/digits (unicode), `_ - . space /` (and `:` except on Windows), keys
that `posixpath.normpath` would change (`a//b`, a trailing `/`) and keys over 250 characters
(mlflow/utils/validation.py). Stages therefore never put a name into a key themselves: they build keys
with `metric_key(...)`, and when names are condition names they first map the whole set with
`key_parts(...)`, which keeps the parts distinct (docs/ingest.md, "Condition names in MLflow").

One part is one component of a dotted key (`label_images.<part>`), so inside a part `.`, `/` and `:`
(hierarchy, path, Windows) become `_` as well.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass, field

MAX_KEY = 250  # MLflow's limit on a metric/param/tag key
MAX_PART = 100  # a part longer than this is cut and given a hash suffix (keys stay well under MAX_KEY)

_ALLOWED_PUNCT = "_-"
_WS = re.compile(r"\s+")


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:8]


def key_part(name: str) -> str:
    """One free-text name -> a valid, readable key part, independent of any other name.

    `Effusion (left)` -> `Effusion_left`, `Pleural effusion/thickening` -> `Pleural effusion_thickening`,
    `Kerley-B lines` and `Ödem` unchanged. A run of other characters (with any spaces in it) becomes
    one `_`; a run of plain whitespace one space; ends are trimmed. A name with nothing usable left
    becomes `unnamed_<hash>`; a very long one is cut and suffixed with a hash of the whole name.
    """
    text = unicodedata.normalize("NFC", str(name))
    out: list[str] = []
    pending = ""  # "" | " " | "_": what the current run of non-word characters turns into
    for ch in text:
        if ch.isalnum() or ch in _ALLOWED_PUNCT:
            if pending and out:
                out.append(pending)
            pending = ""
            out.append(ch)
        elif ch.isspace():
            pending = pending or " "
        else:
            pending = "_"
    part = "".join(out).strip(" _")
    if not part:
        return f"unnamed_{_short_hash(text)}"
    if len(part) > MAX_PART:
        part = part[: MAX_PART - 9].rstrip(" _") + "-" + _short_hash(text)
    return part


class NameCollisionError(ValueError):
    """Two names could not be given distinct keys (never expected: `key_parts` adds hash suffixes)."""


@dataclass
class KeyParts:
    """Name -> key part for a set of names, distinct even on case-insensitive stores, and what happened."""

    parts: dict[str, str]
    # human-readable lines, one per group of names that would have shared a key (empty when none)
    collisions: list[str] = field(default_factory=list)

    def __getitem__(self, name: str) -> str:
        return self.parts[name] if name in self.parts else key_part(name)

    def changed(self) -> dict[str, str]:
        """The names whose key part differs from the name (for reports: which key holds which name)."""
        return {n: p for n, p in sorted(self.parts.items()) if n != p}


def key_parts(names: Iterable[str], what: str = "condition names") -> KeyParts:
    """Key parts for a set of names (e.g. every label of an image store), distinct from one another.

    Names whose parts would be equal, or equal up to case (a MySQL-backed tracking server and a
    case-insensitive file system treat `Mass` and `mass` as one key), all get a suffix with a hash of
    the name itself (`Mass-1a2b3c4d`, `mass-5e6f7a8b`), so every condition keeps its own metric; each
    such group is described in `collisions`, which stages log as a warning. The mapping of a name
    depends only on the names it collides with, so every stage that maps the same set agrees.
    """
    uniq = sorted(set(map(str, names)))
    base = {n: key_part(n) for n in uniq}
    groups: dict[str, list[str]] = {}
    for n in uniq:
        groups.setdefault(base[n].casefold(), []).append(n)
    parts = dict(base)
    notes: list[str] = []
    for members in groups.values():
        if len(members) < 2:
            continue
        for n in members:
            parts[n] = f"{base[n][: MAX_PART - 9]}-{_short_hash(n)}"
        shown = ", ".join(f"'{n}' -> '{parts[n]}'" for n in members)
        same_case = len({base[n] for n in members}) == 1
        why = "give the same MLflow key" if same_case else "give MLflow keys that differ only in case"
        notes.append(
            f"{what} {', '.join(repr(n) for n in members)} {why} ({base[members[0]]!r}); each keeps its own "
            f"key with a hash suffix: {shown}. If they are one condition, write it one way in the labels"
        )
    folded = [p.casefold() for p in parts.values()]
    if len(set(folded)) != len(folded):  # a suffixed part equal to another name's part: astronomically rare
        raise NameCollisionError(f"{what} could not be given distinct MLflow keys: {sorted(uniq)}")
    return KeyParts(parts, notes)


def metric_key(*parts: str) -> str:
    """A dotted MLflow key from parts, each made safe with `key_part` unless already valid.

    Parts that are fixed identifiers (`label_images`, `test`, `k5`) pass unchanged; for condition
    names, pass the part from `key_parts` so that colliding names stay distinct.
    """
    key = ".".join(p if _is_part(p) else key_part(p) for p in parts)
    if len(key) > MAX_KEY:
        key = key[: MAX_KEY - 9] + "-" + _short_hash(key)
    return key


def _is_part(p: str) -> bool:
    return bool(p) and key_part(p) == p


def is_valid_key(key: str) -> bool:
    """The rule MLflow (3.x, mlflow/utils/validation.py) applies to metric/param/tag keys on every OS."""
    import posixpath

    if not key or len(key) > MAX_KEY or not re.fullmatch(r"[/\w.\- ]*", key):
        return False
    norm = posixpath.normpath(key)
    return not (norm != key or norm == "." or norm.startswith("..") or norm.startswith("/"))


# ------------------------------------------------------------------------------------- registry names
# MLflow's rules for a registered model name (3.x, mlflow/utils/validation.py `_validate_model_name`): not
# empty, no '/' or ':', unchanged by `posixpath.normpath`; its SQL stores keep at most 256 characters. fewscan
# adds what its URIs need: no '@' (`models:/NAME@ALIAS`). Its own names are lower case, so that no two of
# them differ by case alone (a MySQL server compares names case-insensitively).
MAX_REGISTRY_NAME = 256
_SLUG_PART = 60  # readable words kept per part; the hash keeps longer names distinct


def _ascii_words(name: str) -> str:
    """Lower-case ASCII words joined by '-': 'Pleural Thickening' -> 'pleural-thickening', 'Ödem' -> 'odem',
    '肺炎' -> '' (no Latin form). Lossy by design: the readable half of a registry name only."""
    text = unicodedata.normalize("NFKD", str(name))
    ascii_text = "".join(c for c in text if not unicodedata.combining(c))
    slug = re.sub(r"[^a-z0-9]+", "-", ascii_text.lower()).strip("-")
    return slug[:_SLUG_PART].rstrip("-")


def adapted_model_name(suite: str | None, condition: str) -> str:
    """The registered model name of the model adapted to `condition` by `suite`'s adapt stage (the one rule,
    docs/adapt.md "Registered name"): `fewscan-<suite>-<condition>-<hash>`, e.g. ('demo_quick', 'Hernia') ->
    'fewscan-demo-quick-hernia-1a2b3c4d'.

    The words are for people and lose case, accents, punctuation and non-Latin letters; the 8-hex hash of
    the exact (NFC) suite and condition names keeps every pair apart: two suites adapting 'Hernia' never
    share a name (so neither moves the other's alias), nor do '肺炎' and '肺癌', 'Mass' and 'mass', or
    ('a-b', 'c') and ('a', 'b-c'). Without a suite (an adapt run of no suite) the suite part is left out.
    """
    suite_text = unicodedata.normalize("NFC", suite or "")
    cond_text = unicodedata.normalize("NFC", str(condition))
    words = [w for w in (_ascii_words(suite_text), _ascii_words(cond_text) or "condition") if w]
    digest = _short_hash(f"{suite_text}\0{cond_text}")
    return "-".join(["fewscan", *words, digest])


def registry_name_problem(name: str) -> str | None:
    """Why `name` cannot be a registered model name fewscan writes and reads back, or None if it can."""
    if not name.strip():
        return "it is empty"
    if len(name) > MAX_REGISTRY_NAME:
        return f"it is longer than {MAX_REGISTRY_NAME} characters"
    bad = sorted({c for c in name if c in "/:@"})
    if bad:
        return (
            f"it contains {' '.join(repr(c) for c in bad)} (MLflow and model URIs allow no '/', ':' or '@')"
        )
    if name in (".", "..") or name.startswith(".."):
        return "it would be read as a path ('.' or '..')"
    return None
