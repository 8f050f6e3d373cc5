"""Reading configs: YAML files (YAML 1.2 numbers, no Python objects, a key given twice refused) and
``section.key=value`` overrides; errors name the file and line, or the key."""
from __future__ import annotations

import re
from pathlib import Path

import yaml

from hpdm.errors import ConfigError


def parse_overrides(overrides: list[str]) -> dict:
    """``["model.levels=2", "train.lr=1e-3"]`` -> nested dict; values are parsed as YAML."""
    out: dict = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or "." not in key.strip("."):
            raise ConfigError(item, "overrides must look like section.key=value")
        node = out
        *parents, leaf = key.split(".")
        for i, p in enumerate(parents):
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(".".join(parents[:i + 1]), f"set to a value by one override and to keys by {item!r}")
        try:
            node[leaf] = load_yaml(raw)
        except yaml.YAMLError as e:
            raise ConfigError(key, f"override {item!r} is not valid YAML: {_yaml_problem(e)}") from None
    return out


def _yaml_problem(e: yaml.YAMLError) -> str:
    """The parser's complaint without its excerpt of the text (``problem`` of a MarkedYAMLError)."""
    return getattr(e, "problem", None) or str(e).splitlines()[0]


def merge(base: dict, extra: dict) -> dict:
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict) and k != "deepspeed":
            merge(base[k], v)
        else:
            base[k] = v
    return base


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping (YAML forbids it; PyYAML keeps the last, so a
    second ``train:`` section would silently replace the first)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` may repeat keys: that is what it is for
                continue
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, (str, int, float, bool)):  # unhashable keys: the base class reports them
                continue
            if key in seen:
                raise yaml.constructor.ConstructorError("while constructing a mapping", node.start_mark,
                                                        f"found the key {key!r} twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


# YAML 1.2's numbers, not PyYAML's YAML 1.1 ones: 010 is ten (1.1: octal 8), 1:30 is a string (1.1: 90)
_INT, _FLOAT = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"
_UniqueKeyLoader.yaml_implicit_resolvers = {
    c: [(tag, rx) for tag, rx in rules if tag not in (_INT, _FLOAT)] for c, rules in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_UniqueKeyLoader.add_implicit_resolver(_INT, re.compile(r"^(?:[-+]?[0-9][0-9_]*|0o[0-7]+|0x[0-9a-fA-F]+)$"),
                                       list("-+0123456789"))
_UniqueKeyLoader.add_implicit_resolver(_FLOAT, re.compile(r"""^(?:[-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+][0-9]+)?
    |\.[0-9][0-9_]*(?:[eE][-+][0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$""", re.X), list("-+0123456789."))


def _yaml_int(loader, node) -> int:
    text = loader.construct_scalar(node).replace("_", "")
    return int(text, 0 if text[:2] in ("0o", "0x") else 10)


_UniqueKeyLoader.add_constructor(_INT, _yaml_int)


def load_yaml(text: str):
    """A YAML document without Python objects, duplicate keys refused."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader)


def read_yaml(path: Path) -> dict:
    """The mapping in a YAML config file; a missing or unreadable file, a syntax error (with its line and column)
    or a document that is not a mapping raises ConfigError naming the file."""
    if not path.is_file():
        raise ConfigError(str(path), "is a folder, not a config file" if path.is_dir() else "no such config file")
    try:
        data = load_yaml(path.read_text())
    except OSError as e:
        raise ConfigError(str(path), f"cannot read the config file: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(str(path), f"not a text file ({e.reason} at byte {e.start})") from None
    except yaml.YAMLError as e:
        mark, context = getattr(e, "problem_mark", None), getattr(e, "context_mark", None)
        if mark is None:
            raise ConfigError(str(path), f"YAML syntax error: {_yaml_problem(e)}") from None
        detail = f"column {mark.column + 1}"
        if context is not None and context.line != mark.line:
            detail += f"; {e.context} that starts on line {context.line + 1}"
        raise ConfigError(f"{path}:{mark.line + 1}", f"YAML syntax error: {_yaml_problem(e)} ({detail})") from None
    if data is None:
        raise ConfigError(str(path), "is empty; give sections (model, diffusion, data, train), or leave --config out "
                                     "for configs/tiny.yaml")
    if not isinstance(data, dict):
        raise ConfigError(str(path), f"must hold a mapping of sections (model, diffusion, data, train); got a "
                                     f"{type(data).__name__}")
    return data
