"""Names read from files (a pack's district, a label's tile id, a Flower node's claim) are data: one rule says which
may name a file or folder, and `printable` shows any text from a file without letting it drive the terminal."""
from __future__ import annotations

import json
from pathlib import Path

from nfed.common.errors import DataError, NfedError

MAX_NAME = 100
NAME_RULE = (f"up to {MAX_NAME} printable characters without '/', '\\' or ',', not starting with '.', "
             "no space at either end")
_FORBIDDEN = ("/", "\\", ",")   # separators of paths on any system, and of the --districts list


def safe_name(name) -> bool:
    """Whether `name` may be a file or folder name inside an output folder (and an entry of --districts): never
    '.', '..', a path, hidden, a control or formatting character; any script (Korean names) is fine."""
    return (isinstance(name, str) and 0 < len(name) <= MAX_NAME and name.isprintable() and name == name.strip()
            and not name.startswith(".") and not any(c in name for c in _FORBIDDEN))


def check_name(name, source: str, what: str = "district name", error: type[NfedError] = DataError) -> str:
    """`name` when it passes `safe_name`, else `error` in one line naming `source` (the file it was read from)."""
    if safe_name(name):
        return name
    shown = f"'{printable(name[:MAX_NAME])}'" if isinstance(name, str) else printable(repr(name)[:MAX_NAME])
    raise error(f"{printable(source)}: {what} {shown} cannot be a file or folder name ({NAME_RULE})")


def child_path(parent: str | Path, name: str, suffix: str = "", *, source: str | None = None,
               what: str = "district name") -> Path:
    """parent/<name><suffix> for a name read from a file: the name checked by the rule and the path one level
    inside `parent`, whatever the name (the last line of defence before writing)."""
    parent = Path(parent)
    check_name(name, source if source is not None else str(parent), what)
    path = parent / f"{name}{suffix}"
    if path.parent != parent or path.name != f"{name}{suffix}":
        raise DataError(f"{printable(str(parent))}: {what} '{printable(name)}' cannot be a file or folder name "
                        f"(it leaves the folder)")
    return path


def printable(text, *, newlines: bool = False, json_text: bool = False) -> str:
    """`text` with every character a terminal could act on (C0/C1 controls, ESC, DEL, bidirectional and other
    formatting characters) shown as its escape, so nothing read from a file can move the cursor, clear the
    screen or retitle the window. `newlines` keeps line breaks; `json_text` writes JSON escapes (text that is
    JSON stays JSON with the same values)."""
    text = str(text)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() or (newlines and c == "\n") else
                   json.dumps(c)[1:-1] if json_text else repr(c)[1:-1] for c in text)
