"""Every config key with its type, default and meaning, as Markdown: ``docs/config.md``.

Written from the config dataclasses and the comments beside their fields, so it cannot list a key that does not
exist; a test checks that the file is current. Regenerate with ``python -m hpdm.config_reference > docs/config.md``.
"""
from __future__ import annotations

import dataclasses
import inspect
import io
import re
import textwrap
import tokenize
import typing

from hpdm.config import Config

HEADER = """# Config keys

Every key of a run config, by section: its type, its default (what a key left out of the YAML file takes), and
what it does. Set keys in the YAML file given to `--config`, or on the command line as `section.key=value`
(lists as `[a,b]`). Validation errors name the key. Written by `python -m hpdm.config_reference` from
`hpdm/config.py` and `data_pipeline/config.py`; `tests/test_config.py` checks that this file is current.
"""


def field_comments(cls) -> dict[str, str]:
    """{field: its trailing comment, after the comment lines just above it}, read from the class's source."""
    src = textwrap.dedent(inspect.getsource(cls))
    lines = src.splitlines()
    comments = {t.start[0]: t.string.lstrip("#").strip()
                for t in tokenize.generate_tokens(io.StringIO(src).readline) if t.type == tokenize.COMMENT}
    names = {f.name for f in dataclasses.fields(cls)}
    found = {}
    for i, line in enumerate(lines, 1):
        m = re.match(r"\s+(\w+)\s*:", line)
        if not m or m.group(1) not in names or m.group(1) in found:
            continue
        above, j = [], i - 1
        while j >= 1 and lines[j - 1].strip().startswith("#"):
            above.insert(0, comments[j])
            j -= 1
        trailing = [comments[i]] if i in comments and not line.strip().startswith("#") else []
        found[m.group(1)] = " ".join(above + trailing)
    return found


def _default(f: dataclasses.Field):
    value = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    if isinstance(value, tuple):
        value = list(value)
    if isinstance(value, str):
        return f"`{value!r}`" if not value else f"`{value}`"
    return f"`{str(value).lower() if isinstance(value, bool) else value}`"


def reference() -> str:
    out = [HEADER]
    for section, cls in typing.get_type_hints(Config).items():
        doc = inspect.getdoc(cls) or ""
        out += [f"## {section}", "", *([doc.split("\n\n")[0].replace("\n", " "), ""] if doc and
                                       not doc.startswith(cls.__name__ + "(") else []),
                "| key | type | default | meaning |", "|---|---|---|---|"]
        comments = field_comments(cls)
        for f in dataclasses.fields(cls):
            kind = str(f.type).replace("typing.", "").replace("|", "or")
            meaning = comments.get(f.name, "").replace("|", "\\|")
            out.append(f"| `{section}.{f.name}` | {kind} | {_default(f)} | {meaning} |")
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    print(reference(), end="")
