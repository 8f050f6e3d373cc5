"""The README and docs/ agree with the code: every command they show names options that its parser has, every
config key they name (also as ``key=value``) exists, every file they point to is there."""
import re
import shlex
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

from hpdm.cli import build_parser
from hpdm.config import Config

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SECTIONS = "model|diffusion|train|data"
FILE_SUFFIXES = {"py", "md", "json", "jsonl", "yaml", "safetensors", "lock", "mp4", "png", "txt"}
FOLDERS = "configs|benchmarks|launchers|kernels|hpdm|data_pipeline|tests|docs"
PARSER = build_parser()
COMMANDS = PARSER._subparsers._group_actions[0].choices  # argparse keeps no public map of its subcommands
MAKE_TARGETS = set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.M))


def snippets(text: str) -> list[str]:
    """Lines of fenced code (continuation lines joined) and inline code spans, in order."""
    out, prose, fenced = [], [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif fenced and out and out[-1].endswith("\\"):
            out[-1] = out[-1][:-1] + " " + line.strip()
        elif fenced:
            out.append(line.strip())
        else:
            prose.append(line)
    return out + re.findall(r"`([^`]+)`", "\n".join(prose))


def _tokens(snippet: str) -> list[str]:
    """Shell words without comments and the brackets of optional parts (``[--raw]``)."""
    try:
        return shlex.split(snippet.replace("[", " ").replace("]", " "), comments=True)
    except ValueError:  # an unbalanced quote: prose in a code span, not a command
        return []


def hpdm_problems(snippet: str) -> list[str]:
    """Options of an `hpdm` command (also through `deepspeed -m hpdm.cli`) that do not exist."""
    words = _tokens(snippet)
    starts = [i for i, w in enumerate(words) if w in ("hpdm", "hpdm.cli") or w.endswith("/hpdm")]
    if not starts or ": error:" in snippet:  # not a command, or a quoted error message
        return []
    args, problems = words[starts[0] + 1:], []
    while args and args[0].startswith("-"):
        if args[0] not in PARSER._option_string_actions:
            problems.append(f"hpdm has no option {args[0]}")
        args = args[1:]
    if not args or args[0].startswith("<"):  # `hpdm --debug <command>`
        return problems
    if args[0] not in COMMANDS:
        return [*problems, f"hpdm has no command {args[0]!r}"]
    sub = COMMANDS[args[0]]
    for word in args[1:]:
        if re.fullmatch(r"-[-a-zA-Z][-\w]*(=.*)?", word) and word.split("=")[0] not in sub._option_string_actions:
            problems.append(f"hpdm {args[0]} has no option {word.split('=')[0]}")
    return problems


@cache
def script_options(script: str) -> str:
    """The --help text of a benchmark script."""
    proc = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True, check=True)
    return proc.stdout


def script_problems(snippet: str) -> list[str]:
    """Options of a `python benchmarks/X.py` command that the script's --help does not list."""
    words = _tokens(snippet)
    if len(words) < 2 or not re.fullmatch(r"python3?", words[0]) or not words[1].endswith(".py"):
        return []
    if not (ROOT / words[1]).is_file():
        return [f"{words[1]} does not exist"]
    text = script_options(words[1])
    return [f"{words[1]} has no option {w}" for w in words[2:] if w.startswith("--")
            and not re.search(rf"(^|[\s,]){re.escape(w.split('=')[0])}\b", text)]


def key_problems(snippet: str) -> list[str]:
    """Config keys named in code (``train.level0_steps``) that the config does not have."""
    if ": error:" in snippet:
        return []
    cfg, problems = Config(), []
    for section, name in re.findall(rf"(?<![\w/.~-])({SECTIONS})\.([a-z_0-9]+)\b(?![/.]\w)", snippet):
        if name not in FILE_SUFFIXES and not hasattr(getattr(cfg, section), name):
            problems.append(f"{section}.{name} is not a config key")
    return problems


def file_problems(text: str) -> list[str]:
    """Repository paths named anywhere (outputs like ``benchmarks/x.json`` aside) that do not exist."""
    paths = {p.rstrip(".,:)") for p in re.findall(rf"(?<![\w/.~-])(?:{FOLDERS})/[\w./-]+", text)}
    return [f"{p} does not exist" for p in sorted(paths) if not p.endswith(".json") and not (ROOT / p).exists()]


def make_problems(snippet: str) -> list[str]:
    words = _tokens(snippet)
    if len(words) < 2 or words[0] != "make":
        return []
    return [] if words[1] in MAKE_TARGETS else [f"the Makefile has no target {words[1]}"]


def problems(text: str) -> list[str]:
    found = file_problems(text)
    for snippet in snippets(text):
        found += hpdm_problems(snippet) + script_problems(snippet) + key_problems(snippet) + make_problems(snippet)
    return found


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_doc_agrees_with_the_code(doc):
    text = doc.read_text()
    assert snippets(text), f"{doc.name} shows no code"
    assert problems(text) == [], doc.name


@pytest.mark.parametrize("wrong, why", [
    ("`hpdm sample GEN --outt DIR`", "hpdm sample has no option --outt"),
    ("```\nhpdm eval-synthetic RUN -n 32 \\\n    --fine-strat 0\n```",
     "hpdm eval-synthetic has no option --fine-strat"),
    ("`deepspeed --num_gpus 8 -m hpdm.cli sampel x`", "hpdm has no command 'sampel'"),
    ("`hpdm train --config configs/tiny.yaml train.stepz=5`", "train.stepz is not a config key"),
    ("set `model.levels_per_blok` to", "model.levels_per_blok is not a config key"),
    ("see configs/tiny_2level.yaml.", "configs/tiny_2level.yaml does not exist"),
    ("`make tests`", "the Makefile has no target tests"),
    ("`python benchmarks/train_throughput.py --smoke --fast`", "benchmarks/train_throughput.py has no option --fast"),
])
def test_the_checks_find_what_a_doc_gets_wrong(wrong, why):
    found = problems(wrong)
    assert len(found) == 1 and found[0].startswith(why), found


def test_right_commands_pass_the_checks():
    assert problems("`.venv/bin/hpdm --debug sample runs/x --out d -n 4 --raw [--fine-start 0]` and "
                    "`make test PYTEST_ARGS='-m \"not slow\"'`; `train.level0_steps`, `model.resolution`, "
                    "`train.lock`, `model.safetensors`, `python benchmarks/train_throughput.py --smoke`") == []
