"""Every command the docs show works: each sh/bash/console block is run here, or names what runs it.

The docs are README.md and docs/*.md (performance.md's commands are run by tests/test_bench.py).
The line right before each sh, bash or console code block is one of these markers:

    <!-- doctest: run -->               run for real, by `bash -e -o pipefail`, in a temporary copy of the
                                        repository's example files (compose/, with run/secrets.env as
                                        `make up` leaves it) with the venv's `llmgate` on PATH; it must exit 0.
                                        The blocks of one file run in order, in one copy, so a block may use
                                        what an earlier one made. In console blocks only `$ ` lines run.
    <!-- doctest: run in DIR -->        the same, from DIR of the copy (e.g. `run in compose`)
    <!-- doctest: TEST [TEST ...] -->   the tests that exercise the block (tests/test_x.py::test_name); they
                                        must exist
    <!-- doctest: ci -->                `make test` alone: CI runs it
    <!-- needs: WHAT -->               cannot run without WHAT: Docker, GPU (or both: `Docker, GPU`), or
                                        a running gateway; `<!-- needs: WHAT; doctest: TEST ... -->` names
                                        the tests that cover the behaviour

Any block may also carry `<!-- doctest: file PATH -->`: its text is written to PATH in the copy (a YAML
example that a later `run` block checks with `llmgate check`).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

from support import ROOT

DOCS = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md")])
SHELLS = {"sh", "bash", "console"}
NEEDS = {"Docker", "GPU", "a running gateway"}
SYNOPSIS_TEST = "tests/test_docs.py::test_command_synopses_match_the_cli"
_FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([^\s`]*)")  # indented too: fences inside list items
_MARKER = re.compile(r"^\s*<!--\s*(doctest|needs)\s*:\s*(.*?)\s*-->\s*$")
_TEST_ID = re.compile(r"tests/test_\w+\.py::\w+(\[[^\]\s]+\])?")
_RUN = re.compile(r"run(?: in ((?!/)(?!.*\.\.)[\w./-]+))?")
BLOCK_TIMEOUT_S = 120


@dataclass(frozen=True)
class Block:
    doc: Path
    line: int  # of the opening fence, from 1
    lang: str
    code: str
    marker: str | None  # the line before the fence, when it is a doctest/needs comment

    @property
    def where(self) -> str:
        return f"{self.doc.relative_to(ROOT) if self.doc.is_relative_to(ROOT) else self.doc.name}:{self.line}"


@dataclass(frozen=True)
class Plan:
    kind: str  # run | tests | ci | needs | file
    cwd: str = ""  # run: a directory of the copy
    tests: tuple[str, ...] = ()
    needs: tuple[str, ...] = ()
    path: str = ""  # file: where the block's text goes


def code_blocks(doc: Path, text: str | None = None) -> list[Block]:
    """The fenced code blocks of a Markdown file (indented ones inside list items included)."""
    lines = (doc.read_text() if text is None else text).splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, lang = len(m.group(1)), m.group(2), m.group(3).lower()
        body, j = [], i + 1
        while j < len(lines) and not re.fullmatch(rf"\s*{re.escape(fence[0])}{{{len(fence)},}}\s*", lines[j]):
            body.append(lines[j][indent:] if lines[j][:indent].strip() == "" else lines[j].lstrip())
            j += 1
        before = lines[i - 1] if i > 0 else ""
        blocks.append(Block(doc, i + 1, lang, "\n".join(body) + "\n", before.strip() if _MARKER.match(before) else None))
        i = j + 1
    return blocks


def commands_of(block: Block) -> list[str]:
    """The commands a block runs, comments and blank lines dropped, continuation lines joined."""
    raw = block.code.splitlines()
    if block.lang == "console":
        raw = [line[2:] for line in raw if line.startswith("$ ")]
    out: list[str] = []
    pending = ""
    for line in raw:
        line = pending + line
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        pending = ""
        text = re.sub(r"(^|\s)#.*$", "", line).strip()
        if text:
            out.append(text)
    return out


def plan_of(block: Block) -> Plan:
    """What the marker asks for; ValueError with the reason when it is missing or invalid."""
    if block.marker is None:
        raise ValueError("no marker on the line before the block: add `<!-- doctest: run -->`, "
                         "`<!-- doctest: tests/test_x.py::test_name -->` or `<!-- needs: Docker -->`")
    kind, value = _MARKER.match(block.marker).groups()
    if kind == "needs":
        what, _, rest = value.partition(";")
        needs = tuple(w.strip() for w in what.split(","))
        unknown = [w for w in needs if w not in NEEDS]
        if unknown or not needs:
            raise ValueError(f"`needs: {what.strip()}`: expected {', '.join(sorted(NEEDS))} (or `Docker, GPU`)")
        tests: tuple[str, ...] = ()
        if rest.strip():
            label, _, ids = rest.strip().partition(":")
            if label.strip() != "doctest":
                raise ValueError(f"after `;` expected `doctest: tests/...`, got {rest.strip()!r}")
            tests = _test_ids(ids)
        return Plan("needs", tests=tests, needs=needs)
    if value.startswith("file "):
        path = value[5:].strip()
        if not re.fullmatch(r"(?!/)(?!.*\.\.)[\w./-]+", path):
            raise ValueError(f"`file {path}`: expected a relative path inside the copy")
        return Plan("file", path=path)
    run = _RUN.fullmatch(value)
    if run:
        return Plan("run", cwd=run.group(1) or "")
    if value == "ci":
        if commands_of(block) != ["make test"]:
            raise ValueError("`doctest: ci` is only for a block that is exactly `make test`")
        return Plan("ci")
    return Plan("tests", tests=_test_ids(value))


def _test_ids(text: str) -> tuple[str, ...]:
    ids = tuple(t for t in re.split(r"[\s,]+", text.strip()) if t)
    bad = [t for t in ids if not _TEST_ID.fullmatch(t)]
    if bad or not ids:
        raise ValueError(f"expected test ids like tests/test_x.py::test_name, got {text.strip()!r}")
    return ids


def shell_blocks(docs: list[Path] = DOCS) -> list[Block]:
    return [b for doc in docs for b in code_blocks(doc) if b.lang in SHELLS]


def marker_problems(blocks: list[Block]) -> list[str]:
    problems = []
    for block in blocks:
        try:
            plan = plan_of(block)
        except ValueError as exc:
            problems.append(f"{block.where}: {exc}")
            continue
        if plan.kind == "file":
            problems.append(f"{block.where}: a {block.lang} block is run or names its tests, not written as a file")
    return problems


@cache
def collected_tests() -> frozenset[str]:
    run = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "tests"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    ids = frozenset(line.strip() for line in run.stdout.splitlines() if "::" in line)
    assert ids, f"pytest collected nothing:\n{run.stdout}\n{run.stderr}"
    return ids


def missing_tests(blocks: list[Block], collected: frozenset[str]) -> list[str]:
    """Named tests that pytest does not collect (`tests/x.py::t` also matches its parametrized `t[...]`)."""
    problems = []
    for block in blocks:
        try:
            plan = plan_of(block)
        except ValueError:
            continue
        for test in plan.tests:
            if test not in collected and not any(c.startswith(test + "[") for c in collected):
                problems.append(f"{block.where}: {test} is not a test pytest collects")
    return problems


# ---------------------------------------------------------------- running blocks


def make_copy(tmp: Path) -> Path:
    """The example files as a user has them after `make up`: compose/, .venv and run/secrets.env."""
    copy = tmp / "repo"
    shutil.copytree(ROOT / "compose", copy / "compose", ignore=shutil.ignore_patterns(".env"))
    (copy / ".venv").symlink_to(ROOT / ".venv")
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMGATE_")}
    subprocess.run([sys.executable, "-c", "import sys; from pathlib import Path; from controller.ops.secrets import ensure_secrets; "
                    "ensure_secrets(Path(sys.argv[1]))", str(copy / "run")], check=True, cwd=ROOT, env=env)
    return copy


def shell_env(copy: Path) -> dict[str, str]:
    """A fresh shell: the venv first on PATH, none of llmgate's variables set."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LLMGATE_", "PYTEST_", "TEAM_"))}
    env["PATH"] = f"{ROOT / '.venv' / 'bin'}:{env.get('PATH', '/usr/bin:/bin')}"
    env["HOME"] = str(copy / "home")
    (copy / "home").mkdir(exist_ok=True)
    return env


def run_doc(doc: Path, copy: Path, blocks: list[Block] | None = None) -> list[str]:
    """Run a doc's `run` blocks in order (writing its `file` blocks first where they come); returns failures."""
    failures = []
    for block in code_blocks(doc) if blocks is None else blocks:
        try:
            plan = plan_of(block)
        except ValueError:
            continue
        if plan.kind == "file":
            target = copy / plan.path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(block.code)
            continue
        if plan.kind != "run":
            continue
        script = "\n".join(commands_of(block)) if block.lang == "console" else block.code
        cwd = copy / plan.cwd
        try:
            run = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", script], cwd=cwd, env=shell_env(copy),
                                 capture_output=True, text=True, timeout=BLOCK_TIMEOUT_S, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            failures.append(f"{block.where}: did not finish in {BLOCK_TIMEOUT_S}s:\n{block.code}")
            continue
        if run.returncode != 0:
            failures.append(f"{block.where}: exited {run.returncode} in {cwd}:\n{block.code}"
                            f"--- stdout\n{run.stdout[-3000:]}--- stderr\n{run.stderr[-3000:]}")
    return failures


def docs_with_run_blocks() -> list[Path]:
    out = []
    for doc in DOCS:
        for block in code_blocks(doc):
            try:
                if plan_of(block).kind == "run":
                    out.append(doc)
                    break
            except ValueError:
                pass
    return out


# ---------------------------------------------------------------- the tests


def test_every_shell_block_has_a_valid_marker():
    blocks = shell_blocks()
    assert len(blocks) > 20, "the docs lost their commands, or the parser lost the blocks"
    problems = marker_problems(blocks)
    assert not problems, "\n".join(problems)


def test_named_tests_exist():
    """Tests named by markers, and test ids the prose cites (`tests/test_x.py::test_name`), exist."""
    collected = collected_tests()
    problems = missing_tests(shell_blocks(), collected)
    for doc in DOCS:
        for number, line in enumerate(doc.read_text().splitlines(), 1):
            for test in _TEST_ID.finditer(line):
                test = test.group(0)
                if test not in collected and not any(c.startswith(test + "[") for c in collected):
                    problems.append(f"{doc.relative_to(ROOT)}:{number}: {test} is not a test pytest collects")
    assert not problems, "\n".join(sorted(set(problems)))


@pytest.mark.parametrize("doc", docs_with_run_blocks(), ids=lambda p: p.name)
def test_run_blocks_succeed(doc, tmp_path):
    failures = run_doc(doc, make_copy(tmp_path))
    assert not failures, "\n\n".join(failures)


# -- command synopses: `llmgate SUBCOMMAND [--option ...]` lines checked against the real parser


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    out = {s: a for a in parser._actions for s in a.option_strings}
    for sub in _subparsers(parser).values():
        out.update(_options(sub))
    return out


def synopsis_problems(lines: list[str]) -> list[str]:
    """Each `llmgate ...` line names real subcommands, only their options, and their exact choices."""
    from controller.cli import build_parser
    from fakevllm.__main__ import build_parser as fake_vllm_parser

    commands = _subparsers(build_parser())
    commands["fake-vllm"] = fake_vllm_parser()  # a program of its own: `llmgate fake-vllm` passes its options on
    problems = []
    for line in lines:
        words = re.split(r"[\s\[\]|]+", line)
        if "llmgate" not in [Path(w).name for w in words]:
            continue
        after = words[[Path(w).name for w in words].index("llmgate") + 1:]
        if not after or after[0] not in commands:
            problems.append(f"{line!r}: `llmgate {after[0] if after else ''}` is not a subcommand")
            continue
        named = [commands[w] for w in after if w in commands]
        options: dict[str, argparse.Action] = {}
        for parser in named:
            options.update(_options(parser))
        tokens = re.split(r"\s+", line.replace("[", " ").replace("]", " "))
        for i, token in enumerate(tokens):
            if not token.startswith("--"):
                continue
            action = options.get(token)
            if action is None:
                problems.append(f"{line!r}: {token} is not an option of `llmgate {after[0]}`")
                continue
            given = tokens[i + 1] if i + 1 < len(tokens) else ""
            if action.choices and "|" in given and set(given.split("|")) != set(action.choices):
                problems.append(f"{line!r}: {token} takes {'|'.join(action.choices)}, the line says {given}")
    return problems


def test_command_synopses_match_the_cli():
    blocks = [b for b in shell_blocks() if b.marker and SYNOPSIS_TEST in b.marker]
    assert blocks, f"no block names {SYNOPSIS_TEST}"
    problems = []
    for block in blocks:
        joined: list[str] = []
        for line in block.code.splitlines():  # a line that starts indented continues the command above
            if line[:1].isspace() and joined:
                joined[-1] += " " + line.strip().rstrip("\\")
            else:
                joined.append(line.rstrip("\\"))
        checked = [re.sub(r"(^|\s)#.*$", "", line) for line in joined if "llmgate" in line]
        if not checked:
            problems.append(f"{block.where}: names {SYNOPSIS_TEST} but shows no llmgate command")
        problems += [f"{block.where}: {p}" for p in synopsis_problems(checked)]
    assert not problems, "\n".join(problems)


# -- the configuration reference covers every key the code reads


def test_configuration_reference_names_every_key():
    """Each key the loaders read appears in docs/configuration.md, alone or at the end of a path (`budget.usd_per_month`)."""
    from controller.model import config, teams

    text = (ROOT / "docs" / "configuration.md").read_text()
    keys = set(config._TOP_KEYS | config._GENERAL_KEYS | config._LITELLM_KEYS | config._ROUTER_KEYS)
    keys |= config._PARAM_KEYS | config._MODEL_INFO_KEYS | {"model_name", "litellm_params", "model_info"}
    keys |= teams._GATEWAY_KEYS | teams._TEAM_KEYS | {"tokens_per_month", "usd_per_month"}  # budget
    keys |= {"certificates", "domains", "cert", "key"}  # gateway.tls
    keys |= {"sha256", "env", "name"}  # the mapping forms of a team key
    keys |= set(config.ROUTING_STRATEGIES)
    missing = sorted(k for k in keys if not re.search(rf"(?<=[`.{{\s\[]){re.escape(k)}(?=[`:])", text))
    assert not missing, f"docs/configuration.md does not mention {', '.join(missing)}"


# -- links between the docs lead somewhere


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lowercase, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(doc: Path) -> set[str]:
    inside, out = False, set()
    for line in doc.read_text().splitlines():
        if _FENCE.match(line):
            inside = not inside
        elif not inside and line.startswith("#"):
            out.add(_slug(line.lstrip("#")))
    return out


def link_problems(docs: list[Path]) -> list[str]:
    problems = []
    for doc in docs:
        for number, line in enumerate(doc.read_text().splitlines(), 1):
            for target in re.findall(r"\]\(([^)\s]+)\)", line):
                if re.match(r"[a-z]+:", target):
                    continue  # http:, https:, mailto:
                path, _, anchor = target.partition("#")
                file = (doc.parent / path).resolve() if path else doc
                if not file.exists():
                    problems.append(f"{doc.name}:{number}: {target}: no file {path}")
                elif anchor and file.suffix == ".md" and anchor not in _anchors(file):
                    problems.append(f"{doc.name}:{number}: {target}: no heading #{anchor} in {file.name}")
    return problems


def test_links_between_docs_resolve():
    problems = link_problems(DOCS)
    assert not problems, "\n".join(problems)


# -- the checker itself can fail


def _doc(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "doc.md"
    path.write_text(text)
    return path


def test_a_block_without_a_marker_is_reported(tmp_path):
    doc = _doc(tmp_path, "Text\n\n```sh\nllmgate check\n```\n\n<!-- doctest: run -->\n```bash\ntrue\n```\n")
    problems = marker_problems(shell_blocks([doc]))
    assert len(problems) == 1 and "doc.md:3: no marker" in problems[0]


@pytest.mark.parametrize("marker, reason", [
    ("<!-- doctest: tests/test_keys.py -->", "expected test ids"),
    ("<!-- doctest: running -->", "expected test ids"),
    ("<!-- doctest: run in ../elsewhere -->", "expected test ids"),
    ("<!-- doctest: ci -->", "exactly `make test`"),
    ("<!-- needs: a GPU -->", "expected"),
    ("<!-- needs: Docker; tests/test_compose.py::x -->", "after `;`"),
    ("<!-- doctest: file x.yaml -->", "not written as a file"),
])
def test_invalid_markers_are_reported(tmp_path, marker, reason):
    doc = _doc(tmp_path, f"{marker}\n```console\n$ make up\n```\n")
    problems = marker_problems(shell_blocks([doc]))
    assert len(problems) == 1 and reason in problems[0], problems


def test_valid_markers_pass(tmp_path):
    doc = _doc(tmp_path, "<!-- doctest: ci -->\n```sh\nmake test   # everything\n```\n"
                         "   <!-- needs: Docker, GPU; doctest: tests/test_compose.py::test_x -->\n   ```sh\n   docker compose up\n   ```\n"
                         "<!-- doctest: run in compose -->\n~~~bash\ntrue\n~~~\n")
    assert marker_problems(shell_blocks([doc])) == []


def test_a_named_test_that_does_not_exist_is_reported(tmp_path):
    doc = _doc(tmp_path, "<!-- doctest: tests/test_up.py::test_banner_curl_command_works tests/test_up.py::test_nothing -->"
                         "\n```sh\nmake up\n```\n"
                         "<!-- doctest: tests/test_edge_reload.py::test_new_team_is_served_within_2s_of_saving -->"
                         "\n```sh\nllmgate reload\n```\n")
    collected = frozenset({"tests/test_up.py::test_banner_curl_command_works",
                           "tests/test_edge_reload.py::test_new_team_is_served_within_2s_of_saving[map]"})
    assert missing_tests(shell_blocks([doc]), collected) == ["doc.md:2: tests/test_up.py::test_nothing is not a test pytest collects"]


def test_a_failing_run_block_is_reported_and_file_blocks_are_written(tmp_path):
    doc = _doc(tmp_path, "<!-- doctest: file conf/x.yaml -->\n```yaml\na: 1\n```\n"
                         "<!-- doctest: run -->\n```sh\ngrep -q 'a: 1' conf/x.yaml\nllmgate --help >/dev/null\n```\n"
                         "<!-- doctest: run -->\n```console\n$ llmgate check --teams nowhere.yaml\nok\n```\n")
    copy = tmp_path / "copy"
    copy.mkdir()
    failures = run_doc(doc, copy)
    assert len(failures) == 1 and failures[0].startswith("doc.md:11: exited 2"), failures


def test_synopsis_lines_are_checked_against_the_parser():
    assert synopsis_problems(["llmgate usage [--by team,model] [--format table|csv|json|html] [--budget]",
                              "llmgate check | render --out DIR | reload", "llmgate key new --team T | key revoke KEY"]) == []
    problems = synopsis_problems(["llmgate usage [--bogus]", "llmgate frobnicate", "llmgate usage --format table|xml"])
    assert len(problems) == 3, problems


def test_a_broken_link_is_reported(tmp_path):
    doc = _doc(tmp_path, "# Top\n\n## A `b`: c\n\n[ok](#a-b-c) [bad](#nope) [gone](missing.md) [web](https://x.y/z)\n")
    assert link_problems([doc]) == ["doc.md:5: #nope: no heading #nope in doc.md", "doc.md:5: missing.md: no file missing.md"]
