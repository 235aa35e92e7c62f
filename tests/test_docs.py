"""Every command in README.md and docs/*.md runs as written, and every link there resolves.

Commands are read from the fenced ```bash, ```sh and ```console blocks (in a console block only
the lines that start with "$ "). Nothing is run for real: `distill SUBCOMMAND ... --help` must
succeed and the whole line must parse with distill's own parser; `scripts/dev.sh X` must name a
case of the script; `python bench/X.py` must exist and declare every option given; every repository path a
command names must exist; every config key an override or the text names must be in the schema;
`pytest -m EXPR` may name registered markers only. Output shown without a command belongs in a
block without a language, which is not read.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import functools
import io
import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOC_FILES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
COMMAND_LANGS = {"bash", "sh", "shell", "console"}
# Top-level directories of the repository: a command's argument starting with one is a path into it.
REPO_DIRS = ("configs/", "bench/", "scripts/", "launch/", "distill/", "tests/", "docs/", "data_pipelines/")
SEPARATORS = {"&&", "||", ";", "|", "&"}
PYTHON = re.compile(r"(^|/)python(3(\.\d+)?)?$")
ENV_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
# Backticked text that is not a config key although it starts like one (file names).
FILE_SUFFIXES = (
    ".json",
    ".jsonl",
    ".yaml",
    ".py",
    ".md",
    ".html",
    ".txt",
    ".sbatch",
    ".jinja",
    ".safetensors",
)


@dataclasses.dataclass(frozen=True)
class Command:
    file: str  # relative to the repository
    line: int
    text: str

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}: {self.text}"


def rel(path: Path) -> str:
    return str(path.relative_to(REPO))


def fenced_blocks(text: str) -> list[tuple[str, int, list[str]]]:
    """(language, first line number, lines) of every fenced block, indented ones too."""
    blocks, lang, start, body, inside = [], "", 0, [], False
    for n, line in enumerate(text.splitlines(), 1):
        m = re.match(r"^\s*```\s*([\w+-]*)\s*$", line)
        if not inside and m:
            inside, lang, start, body = True, m.group(1).lower(), n + 1, []
        elif inside and m and not m.group(1):
            blocks.append((lang, start, body))
            inside = False
        elif inside:
            body.append(line)
    assert not inside, "an unclosed code fence"
    return blocks


def commands_of(path: Path) -> list[Command]:
    out = []
    for lang, start, body in fenced_blocks(path.read_text()):
        if lang not in COMMAND_LANGS:
            continue
        pending, first = "", 0
        for offset, line in enumerate(body):
            line = line.strip()
            if not pending:
                if lang == "console":
                    if not line.startswith("$ "):
                        continue
                    line = line[2:]
                if not line or line.startswith("#"):
                    continue
                first = start + offset
            if line.endswith("\\"):
                pending += line[:-1] + " "
                continue
            out.append(Command(rel(path), first, pending + line))
            pending = ""
        assert not pending, f"{rel(path)}:{first}: a command ends with a line continuation"
    return out


COMMANDS = [c for f in DOC_FILES for c in commands_of(f)]


def segments(cmd: Command) -> list[list[str]]:
    try:
        return split_tokens(cmd.text)
    except ValueError as exc:  # unbalanced quotes
        pytest.fail(f"{cmd.where}: not a valid shell line ({exc})")


def split_tokens(line: str) -> list[list[str]]:
    """The simple commands of a line (split at && ; | ...), leading VAR=value assignments dropped."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    tokens = list(lexer)
    out, current = [], []
    for tok in tokens + [";"]:
        if tok in SEPARATORS:
            while current and ENV_ASSIGNMENT.match(current[0]):
                current.pop(0)
            if current:
                out.append(current)
            current = []
        else:
            current.append(tok)
    return out


def without_brackets(tokens: list[str]) -> list[str]:
    """A usage line's optional parts (`[--dry-run]`, `[key=value ...]`) as plain arguments."""
    out = []
    for tok in tokens:
        if tok.startswith("["):
            tok = tok[1:].removesuffix("]")
        elif tok.endswith("]") and "[" not in tok:
            tok = tok[:-1]
        if tok and tok != "...":
            out.append(tok)
    return out


# --- the config schema --------------------------------------------------------------------------


@functools.cache
def schema() -> dict:
    """Config keys as a nested dict; a dict-valued field (its own keys are free) maps to None."""
    from distill.config import Config

    def walk(cls) -> dict:
        out = {}
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if dataclasses.is_dataclass(default):
                out[f.name] = walk(type(default))
            else:
                out[f.name] = None if isinstance(default, dict) else "leaf"
        return out

    return walk(Config)


def key_problem(key: str) -> str | None:
    """Why `key` is not a config key (None when it is)."""
    node = schema()
    parts = key.split(".")
    for i, part in enumerate(parts):
        if node is None:  # inside a dict-valued field: any key
            return None
        if node == "leaf" or part not in node:
            return f"{'.'.join(parts[: i + 1])} is not a config key"
        node = node[part]
    return None  # a leaf, or a whole group (`train.lora`)


def is_placeholder(key: str) -> bool:
    return "key" in key.split(".")


def override_keys(tokens: list[str]) -> list[str]:
    """Keys of the key=value tokens whose key starts with a config group."""
    groups = set(schema())
    out = []
    for tok in tokens:
        m = re.match(r"^([a-z_][a-z0-9_.]*)=", tok)
        if m and m.group(1).split(".")[0] in groups and not is_placeholder(m.group(1)):
            out.append(m.group(1))
    return out


# --- what each kind of command must satisfy -----------------------------------------------------


def run(argv: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    )
    return subprocess.run(
        argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


# `distill WORDS --help` for every subcommand the docs name, all in one fresh process (one
# interpreter start instead of one per subcommand): the console script `distill` is
# distill.cli:main (pyproject.toml [project.scripts]), called here as the script calls it.
HELP_RUNNER = """
import contextlib, io, json, sys
from distill.cli import main
out = {}
for words in json.loads(sys.argv[1]):
    err = io.StringIO()
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            code = main([*words, "--help"])
    except SystemExit as exc:
        code = exc.code
    out[" ".join(words)] = [code if isinstance(code, int) else 1, err.getvalue()]
print(json.dumps(out))
"""


def subcommand_words(args: list[str]) -> tuple[str, ...]:
    """The subcommand (and sub-subcommand or stage names) at the start of distill's arguments."""
    words = []
    for tok in args[:2]:
        if not re.fullmatch(r"[a-z][a-z0-9_,-]*", tok):
            break
        words.append(tok)
    return tuple(words)


@functools.cache
def distill_help() -> dict[str, list]:
    wanted = set()
    for cmd in COMMANDS:
        with contextlib.suppress(ValueError):  # a line shlex cannot read fails in its own test
            for tokens in split_tokens(cmd.text):
                if tokens[0] in ("distill", ".venv/bin/distill") and subcommand_words(tokens[1:]):
                    wanted.add(subcommand_words(tokens[1:]))
    done = run([sys.executable, "-c", HELP_RUNNER, json.dumps(sorted(wanted))], timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@functools.cache
def script_options(script: str) -> set[str]:
    """The option strings a script's argparse parser declares (read from its source: the benchmarks'
    imports take seconds, which a --help would pay for each)."""
    tree = ast.parse((REPO / script).read_text(), script)
    return {
        arg.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "add_argument"
        for arg in node.args
        if isinstance(arg, ast.Constant) and isinstance(arg.value, str)
    }


@functools.cache
def dev_sh_cases() -> set[str]:
    text = (REPO / "scripts" / "dev.sh").read_text()
    body = text[text.index('case "$cmd" in') : text.index("esac")]
    cases = set()
    for m in re.finditer(r"^\s*([a-z][a-z|-]*)\)", body, re.MULTILINE):
        cases.update(m.group(1).split("|"))
    return cases


@functools.cache
def markers() -> set[str]:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    return {m.split(":")[0].strip() for m in pyproject["tool"]["pytest"]["ini_options"]["markers"]}


def check_distill(cmd: Command, args: list[str]) -> list[str]:
    problems = []
    words = subcommand_words(args)
    if not words:
        return [f"{cmd.where}: no subcommand"]
    code, stderr = distill_help()[" ".join(words)]
    if code != 0:
        problems.append(f"{cmd.where}: `distill {' '.join(words)} --help` failed: {stderr.strip()[-300:]}")
        return problems
    from distill.cli import build_parser

    # As distill.cli.main parses: overrides may also follow options (`--round 1 key=value`).
    argv = without_brackets(args)
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            parsed, extra = build_parser().parse_known_args(argv)
    except SystemExit:
        return problems + [f"{cmd.where}: distill's parser refuses it: {err.getvalue().strip()[-300:]}"]
    unknown = [e for e in extra if e.startswith("-") or "=" not in e or not hasattr(parsed, "overrides")]
    if unknown:
        return problems + [f"{cmd.where}: distill does not take {' '.join(unknown)}"]
    for override in [*(getattr(parsed, "overrides", None) or []), *extra]:
        key = override.split("=", 1)[0]
        if "=" not in override:
            problems.append(f"{cmd.where}: {override!r} is not key=value")
        elif not is_placeholder(key) and (why := key_problem(key)):
            problems.append(f"{cmd.where}: {why}")
    return problems


def check_segment(cmd: Command, tokens: list[str]) -> list[str]:
    prog, args = tokens[0], tokens[1:]
    problems = []
    if prog in ("distill", ".venv/bin/distill"):
        problems += check_distill(cmd, args)
    elif prog == "scripts/dev.sh":
        if not args or args[0] not in dev_sh_cases():
            problems.append(
                f"{cmd.where}: scripts/dev.sh has no case {args[:1]} (it has {sorted(dev_sh_cases())})"
            )
    elif PYTHON.search(prog) and args and args[0].endswith(".py"):
        script = args[0]
        if script.startswith(REPO_DIRS) and (REPO / script).is_file():
            declared = script_options(script) | {"-h", "--help"}
            for opt in without_brackets(args[1:]):
                if opt.startswith("-") and opt.split("=")[0] not in declared:
                    problems.append(f"{cmd.where}: {script} has no option {opt.split('=')[0]}")
    # pytest's -m expression: registered markers only (python -m pytest ..., scripts/dev.sh test ...)
    if "pytest" in tokens or (prog == "scripts/dev.sh" and args[:1] == ["test"]):
        for i, tok in enumerate(tokens[:-1]):
            if tok == "-m" and tokens[i + 1] != "pytest":
                names = set(re.findall(r"[A-Za-z_]\w*", tokens[i + 1])) - {"and", "or", "not"}
                if names - markers():
                    problems.append(f"{cmd.where}: unregistered pytest marker(s) {sorted(names - markers())}")
    # Paths into the repository, also as --opt=path or key=path.
    for tok in tokens:
        for part in {tok, tok.split("=", 1)[-1]}:
            if part.startswith(REPO_DIRS) and not (REPO / part).exists():
                problems.append(f"{cmd.where}: {part} does not exist")
    if prog not in ("distill", ".venv/bin/distill"):  # distill's overrides were checked by its parser
        problems += [f"{cmd.where}: {why}" for key in override_keys(tokens) if (why := key_problem(key))]
    return problems


def test_the_docs_have_commands():
    files = {c.file for c in COMMANDS}
    assert "README.md" in files and len(files) > 5
    assert any(c.text.startswith("scripts/dev.sh demo") for c in COMMANDS if c.file == "README.md")


@pytest.mark.parametrize("cmd", COMMANDS, ids=lambda c: f"{c.file}:{c.line}")
def test_every_command_runs_as_written(cmd: Command):
    problems = []
    for tokens in segments(cmd):
        problems += check_segment(cmd, tokens)
    assert not problems, "\n".join(problems)


# --- links, config keys in the text, references from the code -----------------------------------


def prose(text: str) -> str:
    """The text without fenced blocks and inline code."""
    lines, inside = [], False
    for line in text.splitlines():
        if line.strip().startswith("```"):
            inside = not inside
            continue
        if not inside:
            lines.append(line)
    return re.sub(r"`[^`]*`", "", "\n".join(lines))


def heading_anchors(path: Path) -> set[str]:
    """GitHub's anchors for the headings of a markdown file."""
    anchors, seen, inside = set(), {}, False
    for line in path.read_text().splitlines():
        if line.strip().startswith("```"):
            inside = not inside
        m = None if inside else re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            slug = re.sub(r"[^\w\- ]", "", m.group(1).lower()).replace(" ", "-")
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


@pytest.mark.parametrize("doc", DOC_FILES, ids=rel)
def test_every_relative_link_resolves(doc: Path):
    problems = []
    for target in re.findall(r"\]\(([^)\s]+)\)", prose(doc.read_text())):
        if re.match(r"^[a-z]+:", target):  # http:, https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        dest = (doc.parent / file).resolve() if file else doc
        if not dest.exists():
            problems.append(f"{rel(doc)}: link to {target}: {file} does not exist")
        elif anchor and dest.suffix == ".md" and anchor not in heading_anchors(dest):
            problems.append(f"{rel(doc)}: link to {target}: {rel(dest)} has no heading #{anchor}")
    assert not problems, "\n".join(problems)


def names_code(span: str) -> bool:
    """Whether `span` names code rather than a config key (`data.check_model_audio`: distill/data.py)."""
    first, second = span.split(".")[:2]
    package = REPO / "distill" / first
    if (package / f"{second}.py").is_file():
        return True
    for module in (package.with_suffix(".py"), package / "__init__.py"):
        if module.is_file() and re.search(
            rf"^(def|class) {second}\b|^{second}\b\s*[:=]", module.read_text(), re.MULTILINE
        ):
            return True
    return False


@pytest.mark.parametrize("doc", DOC_FILES, ids=rel)
def test_config_keys_named_in_the_text_exist(doc: Path):
    text = re.sub(r"```.*?```", "", doc.read_text(), flags=re.DOTALL)
    problems = []
    for span in set(re.findall(r"`([^`\n]+)`", text)):
        m = re.fullmatch(r"([a-z_]+(?:\.[a-z0-9_]+)+)(=.*)?", span)
        if (
            not m
            or m.group(1).split(".")[0] not in schema()
            or is_placeholder(m.group(1))
            or m.group(1).endswith(FILE_SUFFIXES)
        ):
            continue
        if (why := key_problem(m.group(1))) and not names_code(m.group(1)):
            problems.append(f"{rel(doc)}: `{span}`: {why}")
    assert not problems, "\n".join(problems)


def test_docs_named_in_the_code_exist():
    problems = []
    for path in [
        *REPO.glob("distill/**/*.py"),
        *REPO.glob("data_pipelines/**/*.py"),
        *REPO.glob("bench/*.py"),
        *REPO.glob("configs/*.yaml"),
        *REPO.glob("scripts/*"),
        *REPO.glob("launch/**/*"),
        REPO / "pyproject.toml",
    ]:
        if not path.is_file():
            continue
        text = path.read_text(errors="replace")
        for name in set(re.findall(r"\bdocs/[\w-]+\.md", text)):
            if not (REPO / name).is_file():
                problems.append(f"{rel(path)} names {name}, which does not exist")
        # README sections moved to docs/: a comment citing one ('README, "Acoustic grounding"') is stale.
        if re.search(r'README, "', text):
            problems.append(f"{rel(path)} cites a README section; the topic pages are in docs/")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("doc", DOC_FILES, ids=rel)
def test_code_paths_named_in_the_docs_exist(doc: Path):
    """A repository path in backticks (`distill/filter/stage.py`, `configs/deepspeed/`) names a
    file or folder that exists, so the docs follow the code when it moves."""
    text = doc.read_text()
    problems = []
    for span in set(re.findall(r"`([^`\n]+)`", text)):
        path = span.split()[0].split(":")[0].rstrip(",.")
        if path.startswith(REPO_DIRS) and not re.search(r"[*<]|NNN", path) and not (REPO / path).exists():
            problems.append(f"{rel(doc)}: `{span}`: {path} does not exist")
    assert not problems, "\n".join(problems)
