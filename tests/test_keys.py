"""`llmgate key new|revoke`: only hashes reach teams.yaml, the key is shown once, the rest of the file stays as written."""

from __future__ import annotations

import difflib
import os
import re
import subprocess
from pathlib import Path

import pytest

from controller.model.teams import load_teams
from controller.model.wire import key_hash as hash_key
from controller.ops.keys import KeyCommandError, _replace_checked
from support import LLMGATE, ROOT

ENV_KEY = "sk-team-b-from-the-environment"
# Two hashes that share their first 12 hex digits, to make a prefix ambiguous.
TWIN_1 = "abcdef012345" + "1" * 52
TWIN_2 = "abcdef012345" + "2" * 52

TEAMS_YAML = f"""\
# llmgate teams -- hand-written, comments must survive
gateway:
  listen: 0.0.0.0:8080        # where nginx listens
  key_lookup: map

teams:
  team-a:
    keys:
      - sha256:2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae
      - {{sha256: "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08", name: ci-bot}}   # labelled
      # keys end here
    rpm: 60            # sustained requests per minute
    models: ['llama-3.1-8b-instruct']

  team-b:
   keys:
   - os.environ/TEAM_B_KEY
   - sha256:{TWIN_1}
   rpm:   5            # odd spacing on purpose
  team-c: ~            # no settings yet
  team-d:
    rpm: 1
  team-e:
    keys: [sha256:{TWIN_2}, {{sha256: "{"e" * 64}", name: ci-bot}}]
  team-f:
    keys: []
  team-g:
    keys:              # none yet
"""


@pytest.fixture
def teams_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("TEAM_B_KEY", ENV_KEY)  # load_teams in this process resolves os.environ/ keys too
    path = tmp_path / "teams.yaml"
    path.write_text(TEAMS_YAML)
    path.chmod(0o640)
    return path


def llmgate_key(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*LLMGATE, "key", *args], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "TEAM_B_KEY": ENV_KEY})


def new_key(teams: Path, team: str, *extra: str) -> tuple[str, subprocess.CompletedProcess]:
    result = llmgate_key("new", "--teams", str(teams), "--team", team, *extra)
    assert result.returncode == 0, result.stderr
    keys = re.findall(r"sk-[A-Za-z0-9_-]+", result.stdout + result.stderr)
    assert len(keys) == 1, "the key is printed exactly once"
    return keys[0], result


def line_changes(before: str, after: str) -> tuple[list[str], list[str]]:
    """(removed lines, added lines) between two versions of the file."""
    diff = list(difflib.ndiff(before.splitlines(), after.splitlines()))
    return [d[2:] for d in diff if d.startswith("- ")], [d[2:] for d in diff if d.startswith("+ ")]


def test_new_key_is_shown_once_and_only_its_hash_is_written(teams_file: Path):
    key, result = new_key(teams_file, "team-a")
    lines = result.stdout.splitlines()
    assert key in lines, "the key stands on its own line"
    digest = hash_key(key)
    assert f"key_id {digest[:12]}" in result.stdout
    assert "cannot be shown again" in result.stdout

    text = teams_file.read_text()
    assert key not in text and key[3:] not in text
    removed, added = line_changes(TEAMS_YAML, text)
    assert removed == [] and added == [f"      - sha256:{digest}"]
    assert text.index(added[0]) < text.index("# keys end here"), "appended to team-a's list"

    team, team_key = load_teams(teams_file).key_index()[digest]
    assert (team.name, team_key.name) == ("team-a", None)
    assert len(team.keys) == 3
    assert teams_file.stat().st_mode & 0o777 == 0o640
    assert [p.name for p in teams_file.parent.iterdir()] == ["teams.yaml"], "no temp file left behind"


def test_new_key_with_a_label(teams_file: Path):
    key, result = new_key(teams_file, "team-b", "--name", "deploy-bot")
    digest = hash_key(key)
    assert "key_id deploy-bot" in result.stdout
    removed, added = line_changes(TEAMS_YAML, teams_file.read_text())
    assert removed == [] and added == [f'   - {{sha256: "{digest}", name: deploy-bot}}'], "the list's own indent"
    team, team_key = load_teams(teams_file).key_index()[digest]
    assert (team.name, team_key.key_id) == ("team-b", "deploy-bot")
    assert hash_key(ENV_KEY) in load_teams(teams_file).key_index(), "environment keys stay"


def test_label_that_yaml_would_read_as_a_boolean_is_quoted(teams_file: Path):
    key, _ = new_key(teams_file, "team-a", "--name", "true")
    assert load_teams(teams_file).key_index()[hash_key(key)][1].name == "true"


@pytest.mark.parametrize("team, removed, added", [
    ("team-c", ["  team-c: ~            # no settings yet"],
     ["  team-c:            # no settings yet", "    keys:", "      - sha256:DIGEST"]),
    ("team-d", [], ["    keys:", "      - sha256:DIGEST"]),
    ("team-e", [f'    keys: [sha256:{TWIN_2}, {{sha256: "{"e" * 64}", name: ci-bot}}]'],
     [f'    keys: [sha256:{TWIN_2}, {{sha256: "{"e" * 64}", name: ci-bot}}, sha256:DIGEST]']),
    ("team-f", ["    keys: []"], ["    keys:", "      - sha256:DIGEST"]),
    ("team-g", [], ["      - sha256:DIGEST"]),
])
def test_new_key_for_a_team_without_a_block_list(teams_file: Path, team: str, removed: list[str], added: list[str]):
    key, _ = new_key(teams_file, team)
    digest = hash_key(key)
    assert line_changes(TEAMS_YAML, teams_file.read_text()) == (removed, [a.replace("DIGEST", digest) for a in added])
    assert load_teams(teams_file).key_index()[digest][0].name == team


@pytest.mark.parametrize("args, message", [
    (["--team", "team-x"], "no team team-x"),
    (["--team", "team-a", "--name", "ci-bot"], "has a key named ci-bot already"),
    (["--team", "team-a", "--name", "has space"], "expected a label"),
])
def test_new_key_refusals_leave_the_file_alone(teams_file: Path, args: list[str], message: str):
    result = llmgate_key("new", "--teams", str(teams_file), *args)
    assert result.returncode == 2
    assert message in result.stderr
    assert "sk-" not in result.stdout + result.stderr
    assert teams_file.read_text() == TEAMS_YAML


def test_new_key_refuses_an_invalid_file(teams_file: Path):
    broken = TEAMS_YAML.replace("rpm: 60", "rpm: sixty")
    teams_file.write_text(broken)
    result = llmgate_key("new", "--teams", str(teams_file), "--team", "team-a")
    assert result.returncode == 2
    assert str(teams_file) in result.stderr and "teams.team-a.rpm" in result.stderr
    assert teams_file.read_text() == broken


def test_an_edit_that_would_change_more_than_the_key_is_refused(tmp_path: Path):
    """team-b aliases team-a's mapping: a key added there would belong to both teams."""
    path = tmp_path / "teams.yaml"
    shared = "teams:\n  team-a: &shared\n    rpm: 5\n  team-b: *shared\n"
    path.write_text(shared)
    result = llmgate_key("new", "--teams", str(path), "--team", "team-a")
    assert result.returncode == 2 and "unchanged" in result.stderr
    assert "sk-" not in result.stdout + result.stderr
    assert path.read_text() == shared
    assert [p.name for p in tmp_path.iterdir()] == ["teams.yaml"]


@pytest.mark.parametrize("on_disk, edited", [
    (TEAMS_YAML, TEAMS_YAML.replace("rpm: 60", "rpm: 61")),  # parses, but not to the model asked for
    (TEAMS_YAML + "# someone else's edit\n", TEAMS_YAML),  # the file changed after it was read
])
def test_a_write_is_checked_before_it_replaces_the_file(teams_file: Path, on_disk: str, edited: str):
    teams_file.write_text(on_disk)
    with pytest.raises(KeyCommandError):
        _replace_checked(str(teams_file), TEAMS_YAML, edited, load_teams(teams_file))
    assert teams_file.read_text() == on_disk
    assert [p.name for p in teams_file.parent.iterdir()] == ["teams.yaml"]


@pytest.mark.parametrize("which", ["plaintext", "prefix", "full-hash", "label"])
def test_revoke_restores_the_file(teams_file: Path, which: str):
    key, _ = new_key(teams_file, "team-d", "--name", "temp-key")
    digest = hash_key(key)
    arg = {"plaintext": key, "prefix": digest[:12], "full-hash": f"sha256:{digest}", "label": "temp-key"}[which]
    result = llmgate_key("revoke", "--teams", str(teams_file), arg)
    assert result.returncode == 0, result.stderr
    assert "temp-key" in result.stdout and "team-d" in result.stdout
    assert key not in result.stdout + result.stderr
    assert digest not in load_teams(teams_file).key_index()
    assert line_changes(TEAMS_YAML, teams_file.read_text()) == ([], ["    keys:"]), "only the emptied list stays"


@pytest.mark.parametrize("args, team, removed, added", [
    (["abcdef0123451"], "team-b", [f"   - sha256:{TWIN_1}"], []),
    ([ENV_KEY], "team-b", ["   - os.environ/TEAM_B_KEY"], []),
    (["--team", "team-a", "ci-bot"], "team-a",
     ['      - {sha256: "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08", name: ci-bot}   # labelled'],
     []),
    (["--team", "team-e", "ci-bot"], "team-e", [f'    keys: [sha256:{TWIN_2}, {{sha256: "{"e" * 64}", name: ci-bot}}]'],
     [f"    keys: [sha256:{TWIN_2}]"]),
    ([TWIN_2[:20]], "team-e", [f'    keys: [sha256:{TWIN_2}, {{sha256: "{"e" * 64}", name: ci-bot}}]'],
     [f'    keys: [{{sha256: "{"e" * 64}", name: ci-bot}}]']),
])
def test_revoke_removes_only_that_item(teams_file: Path, args: list[str], team: str, removed: list[str],
                                       added: list[str]):
    before = {t.name: len(t.keys) for t in load_teams(teams_file).teams}
    result = llmgate_key("revoke", "--teams", str(teams_file), *args)
    assert result.returncode == 0, result.stderr
    assert f"team {team}" in result.stdout
    assert line_changes(TEAMS_YAML, teams_file.read_text()) == (removed, added)
    after = {t.name: len(t.keys) for t in load_teams(teams_file).teams}
    assert after == {**before, team: before[team] - 1}
    assert teams_file.stat().st_mode & 0o777 == 0o640


@pytest.mark.parametrize("args, message", [
    (["abcdef012345"], "2 keys match"),  # a prefix both twins share
    (["ci-bot"], "2 keys match"),  # a label two teams use
    (["abcdef01"], "no key of any team matches"),  # too short for a prefix
    (["sk-not-a-key-of-anyone"], "no key of any team matches"),
    (["--team", "team-d", "ci-bot"], "no key of team team-d matches"),
    (["--team", "team-x", "ci-bot"], "no team team-x"),
])
def test_revoke_refusals_leave_the_file_alone(teams_file: Path, args: list[str], message: str):
    result = llmgate_key("revoke", "--teams", str(teams_file), *args)
    assert result.returncode == 2
    assert message in result.stderr
    assert "sk-not-a-key" not in result.stdout + result.stderr, "a plaintext key is never echoed"
    assert teams_file.read_text() == TEAMS_YAML


def test_revoke_with_an_undecodable_argument_is_a_refusal_not_a_crash(teams_file: Path):
    """The shell hands Python undecodable bytes as surrogates: the key hash takes them back as they were sent."""
    result = subprocess.run([*[a.encode() for a in LLMGATE], b"key", b"revoke", b"--teams", str(teams_file).encode(),
                             b"sk-\xff\xfe-not-utf8"], cwd=ROOT, capture_output=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert b"no key of any team matches" in result.stderr and b"Traceback" not in result.stderr
    assert teams_file.read_text() == TEAMS_YAML
