"""`llmgate key new|revoke`: add or remove a team key in teams.yaml, which only ever holds its sha256.

The file is edited as text at the positions its YAML parser reports, so comments, quoting and layout
elsewhere stay byte for byte (a round-trip dumper re-indents unrelated lines). The edited text must
parse to exactly the intended model before it atomically replaces the file.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import secrets
import stat
import sys
import tempfile
from pathlib import Path

import yaml

from controller.model.teams import KEY_LABEL, TeamKey, TeamsConfig, load_teams
from controller.model.wire import key_hash
from controller.model.yamlpath import ConfigError
from controller.ops.secrets import load_saved_secrets

HASH_PREFIX = re.compile(r"[0-9a-fA-F]{12,64}")


class KeyCommandError(Exception):
    """A refusal, told as one line; the file is left as it was."""


def run_key(args: argparse.Namespace) -> int:
    load_saved_secrets(Path(getattr(args, "run_dir", "run")))  # os.environ/ keys that `llmgate up` generated
    try:
        if args.key_command == "new":
            plaintext, key = new_key(args.teams, args.team, args.name)
            print(f"New key for team {args.team} (key_id {key.key_id}), its sha256 added to {args.teams}:\n")
            print(plaintext)
            print("\nThe key itself is not stored anywhere and cannot be shown again: copy it now.")
        else:
            team, key = revoke_key(args.teams, args.which, args.team)
            print(f"Revoked key {key.key_id} of team {team} in {args.teams}.")
    except (ConfigError, KeyCommandError) as exc:
        print(f"llmgate key {args.key_command}: {exc}", file=sys.stderr)
        return 2
    return 0


def new_key(path: str, team_name: str, label: str | None) -> tuple[str, TeamKey]:
    """Create a key for a team and write only its hash into the file; returns the plaintext and the entry."""
    config, text = _load(path)
    team = config.team(team_name)
    if team is None:
        known = ", ".join(t.name for t in config.teams) or "none yet"
        raise KeyCommandError(f"{path}: no team {team_name} (teams: {known}); add it under `teams:` first")
    if label is not None and not KEY_LABEL.fullmatch(label):
        raise KeyCommandError(f"--name {label!r}: expected a label of letters, digits, _ . - (up to 64, "
                              "starting with a letter or digit)")
    if label is not None and any(k.name == label for k in team.keys):
        raise KeyCommandError(f"{path}: team {team_name} has a key named {label} already; "
                              "choose another --name, or revoke that key first")
    plaintext = "sk-" + secrets.token_urlsafe(32)
    key = TeamKey(key_hash(plaintext), label)
    if label is None:
        entry = f"sha256:{key.sha256}"
    else:  # quoted where YAML would read the label as something else (true, 1.5, null)
        name = label if yaml.safe_load(label) == label else f'"{label}"'
        entry = f'{{sha256: "{key.sha256}", name: {name}}}'
    _replace_checked(path, text, _insert_key(text, team_name, entry), _with_keys(config, team_name, team.keys + (key,)))
    return plaintext, key


def revoke_key(path: str, which: str, team_name: str | None = None) -> tuple[str, TeamKey]:
    """Remove the one key that `which` names (plaintext, sha256, 12+ hex prefix or label); returns team and key."""
    config, text = _load(path)
    if team_name is not None and config.team(team_name) is None:
        raise KeyCommandError(f"{path}: no team {team_name}; check --team")
    digest = key_hash(which)
    hex_part = which.removeprefix("sha256:")
    prefix = hex_part.lower() if HASH_PREFIX.fullmatch(hex_part) else None
    matches = [(t.name, i, k) for t in config.teams if team_name in (None, t.name) for i, k in enumerate(t.keys)
               if k.sha256 == digest or k.name == which or (prefix is not None and k.sha256.startswith(prefix))]
    # `which` may be a plaintext key: never echo it back.
    if not matches:
        where = f"team {team_name}" if team_name else "any team"
        raise KeyCommandError(f"{path}: no key of {where} matches; give the key itself, its sha256, "
                              "a hash prefix of 12+ hex digits, or its name")
    if len(matches) > 1:
        found = ", ".join(f"{t}/{k.sha256[:16]}" + (f" ({k.name})" if k.name else "") for t, _, k in matches)
        raise KeyCommandError(f"{path}: {len(matches)} keys match: {found}; give more hex digits, or --team")
    team, index, key = matches[0]
    keys_at = _lookup(_team_node(text, team)[1], "keys")
    owner = config.team(team)
    assert keys_at is not None and isinstance(keys_at[1], yaml.SequenceNode) and owner is not None  # the key is there
    remaining = owner.keys[:index] + owner.keys[index + 1:]
    _replace_checked(path, text, _remove_item(text, keys_at[1], index), _with_keys(config, team, remaining))
    return team, key


# ---------------------------------------------------------------- file and model

def _load(path: str) -> tuple[TeamsConfig, str]:
    config = load_teams(path)
    try:
        with open(path, encoding="utf-8", newline="") as f:  # newline="": keep \r\n as written
            return config, f.read()
    except (OSError, ValueError) as exc:
        raise KeyCommandError(f"{path}: cannot read it as UTF-8 text ({exc})") from None


def _with_keys(config: TeamsConfig, team_name: str, keys: tuple[TeamKey, ...]) -> TeamsConfig:
    teams = tuple(dataclasses.replace(t, keys=keys) if t.name == team_name else t for t in config.teams)
    return dataclasses.replace(config, teams=teams)


def _replace_checked(path: str, old_text: str, new_text: str, expected: TeamsConfig) -> None:
    """Atomically replace the file with new_text, only if it parses to `expected` and nobody changed the file."""
    target = os.path.realpath(path)  # a symlinked teams.yaml stays a symlink
    directory = os.path.dirname(target)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(target)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(new_text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, stat.S_IMODE(os.stat(target).st_mode))
        try:
            result = load_teams(tmp)
        except ConfigError as exc:
            raise KeyCommandError(f"{path}: the edit would make it invalid ({exc}); "
                                  "the file is unchanged; edit it by hand") from None
        if (result.gateway, result.teams) != (expected.gateway, expected.teams):
            raise KeyCommandError(f"{path}: cannot edit this layout safely (anchors or aliases?); "
                                  "the file is unchanged; edit it by hand")
        with open(target, encoding="utf-8", newline="") as f:
            if f.read() != old_text:
                raise KeyCommandError(f"{path} changed while the key was being written; run the command again")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


# ---------------------------------------------------------------- text edits at parser positions

def _team_node(text: str, team_name: str) -> tuple[yaml.Node, yaml.Node]:
    """The team's key and value nodes (the file loaded already, so both exist)."""
    root = yaml.compose(text, Loader=yaml.SafeLoader)
    teams = _lookup(root, "teams")
    found = _lookup(teams[1], team_name) if teams is not None else None
    assert found is not None
    return found


def _lookup(mapping: yaml.Node | None, key: str) -> tuple[yaml.Node, yaml.Node] | None:
    """(key node, value node) of `key`; the last one wins, as when loading."""
    if not isinstance(mapping, yaml.MappingNode):
        return None
    found = [(k, v) for k, v in mapping.value if isinstance(k, yaml.ScalarNode) and k.value == key]
    return found[-1] if found else None


def _insert_key(text: str, team_name: str, entry: str) -> str:
    team_key, team = _team_node(text, team_name)
    found = _lookup(team, "keys")
    if found is None and _is_empty(team):  # `team-a:` or `team-a: {}`
        return _put_block_under(text, team_key, team, ["keys:", f"  - {entry}"])
    if found is None and getattr(team, "flow_style", False):  # `team-a: {rpm: 5}`
        at = team.start_mark.index + 1
        return text[:at] + f"keys: [{entry}], " + text[at:]
    if found is None:  # a block mapping without keys: they go first, as the docs write them
        start = team.start_mark
        return _insert_lines(text, start.index - start.column, start.column, ["keys:", f"  - {entry}"])
    keys_key, keys = found
    if _is_empty(keys):  # `keys:` or `keys: []`
        return _put_block_under(text, keys_key, keys, [f"- {entry}"])
    if getattr(keys, "flow_style", False):
        at = keys.end_mark.index - 1  # before the closing ]
        return text[:at] + f", {entry}" + text[at:]
    return _insert_lines(text, _line_end(text, _end_index(keys.value[-1])), keys.start_mark.column, [f"- {entry}"])


def _remove_item(text: str, seq: yaml.SequenceNode, index: int) -> str:
    items = seq.value
    if not seq.flow_style:  # whole lines, trailing comment included
        start = items[index].start_mark.index - items[index].start_mark.column
        end = _line_end(text, _end_index(items[index]))
    elif index + 1 < len(items):  # `a, ` of `[a, b]`
        start, end = items[index].start_mark.index, items[index + 1].start_mark.index
    elif index > 0:  # `, b` of `[a, b]`
        start, end = _end_index(items[index - 1]), items[index].end_mark.index
    else:
        start, end = items[index].start_mark.index, items[index].end_mark.index
    return text[:start] + text[end:]


def _is_empty(node: yaml.Node) -> bool:
    if isinstance(node, yaml.ScalarNode):
        return node.tag == "tag:yaml.org,2002:null"
    return not node.value


def _put_block_under(text: str, key: yaml.Node, value: yaml.Node, lines: list[str]) -> str:
    """Replace an empty value (`x:`, `x: ~`, `x: []`) with block lines indented under its key."""
    start = value.start_mark.index
    while start > 0 and text[start - 1] in " \t":
        start -= 1
    text = text[:start] + text[value.end_mark.index:]
    return _insert_lines(text, _line_end(text, start), key.start_mark.column + 2, lines)


def _insert_lines(text: str, at: int, column: int, lines: list[str]) -> str:
    newline = "\r\n" if "\r\n" in text else "\n"
    if at == len(text) and text and not text.endswith("\n"):
        text, at = text + newline, at + len(newline)
    return text[:at] + "".join(" " * column + line + newline for line in lines) + text[at:]


def _line_end(text: str, index: int) -> int:
    """Where the line after the one holding `index` starts (the end of the text on the last line)."""
    newline = text.find("\n", index)
    return len(text) if newline < 0 else newline + 1


def _end_index(node: yaml.Node) -> int:
    """Where a node's text ends. A block collection ends with its last child: its own end mark lies past comments."""
    while isinstance(node, (yaml.MappingNode, yaml.SequenceNode)) and not node.flow_style and node.value:
        last = node.value[-1]
        node = last[1] if isinstance(node, yaml.MappingNode) else last
    return node.end_mark.index
