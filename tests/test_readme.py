"""README.md's snippets run, so a stale one fails CI.

Every fenced block of README.md names its language:

- ``python``: run, each in a fresh process (tests/readme_runner.py) in an empty working
  directory, as a user's CPU install runs it: no TRITON_INTERPRET or other MMFAST_ setting
  of the test suite (the ops take their torch backends), and the hub offline (a snippet
  needing a download fails here; the README builds tiny models instead).
- ``bash``: every command is either cheap and run the same way, as ``python -m mmfast ...``
  (help, lists, ``info``: it must exit 0; its text is not checked), or listed in
  SKIPPED_COMMANDS with why it is not.
- ``text``: output or a tree, not run.

A block may be skipped by a marker on the line above it,
``<!-- readme-test: skip (the reason) -->``; at most MAX_MARKED_SKIPS of them.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
LANGUAGES = ("python", "bash", "text")
MAX_MARKED_SKIPS = 2
RUNNER_TIMEOUT_S = 300  # every snippet and command together: ~15 s of CPU time

OPENING = re.compile(r"^```([\w+-]*)\s*$")
CLOSING = re.compile(r"^```\s*$")
SKIP_MARKER = re.compile(r"^<!--\s*readme-test:\s*skip\s*\((?P<reason>.+)\)\s*-->$")
ANY_MARKER = re.compile(r"^\s*<!--\s*readme-test", re.M)  # a whole line, not quoted in prose
ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")

# Flags and subcommands that make an `mmfast` command cheap enough to run here.
CHEAP_WORDS = frozenset({"--help", "-h", "--version", "--list", "info"})
# Commands not run here, by their first words (after VAR=value assignments, with .venv/bin/
# dropped and `python -m mmfast` read as `mmfast`), and why.
SKIPPED_COMMANDS = {
    ("bash", "scripts/test.sh"): "creates .venv and runs the whole test suite, this file included",
    ("bash", "scripts/bench.sh"): "creates .venv and runs every benchmark suite",
    ("bash", "scripts/compat.sh"): "installs a throwaway venv per supported-version row (downloads, tens of minutes)",
    ("bash", "scripts/gpu_evidence.sh"): "the GPU evidence run: needs a CUDA GPU and up to 8 minutes",
    ("python", "-m", "pytest"): "runs a test suite; CI runs the suites itself",
    ("mmfast", "profile"): "builds and times two models (minutes on a CPU); tests/test_profile.py runs it at tiny sizes",
    ("mmfast", "bench"): "benchmark suites: minutes, and meaningful only on a GPU; tests/bench runs them at smoke sizes",
}


@dataclass(frozen=True)
class Block:
    line: int  # of the opening fence, from 1
    language: str
    code: str
    skip: str | None  # the reason of a skip marker on the line above


def fenced_blocks(markdown: str) -> list[Block]:
    lines = markdown.splitlines()
    blocks, i = [], 0
    while i < len(lines):
        opening = OPENING.match(lines[i])
        if opening is None:
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if CLOSING.match(lines[j])), None)
        if end is None:
            raise ValueError(f"README line {i + 1}: the fenced block is never closed")
        above = next((text.strip() for text in reversed(lines[:i]) if text.strip()), "")
        marker = SKIP_MARKER.match(above)
        blocks.append(Block(i + 1, opening.group(1), "\n".join(lines[i + 1:end]) + "\n",
                            marker["reason"].strip() if marker else None))
        i = end + 1
    return blocks


@dataclass(frozen=True)
class Command:
    text: str
    env: dict  # VAR=value assignments in front of it
    words: tuple  # normalised: .venv/bin/ dropped, `python -m mmfast` read as `mmfast`


def shell_commands(code: str) -> list[Command]:
    """The commands of a bash block, one a line (a trailing backslash continues it)."""
    commands, pending = [], ""
    for line in code.splitlines():
        pending += line
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        words = shlex.split(pending, comments=True)
        text, pending = shlex.join(words), ""
        env = {}
        while words and ASSIGNMENT.match(words[0]):
            name, value = words.pop(0).split("=", 1)
            env[name] = value
        words = [w.removeprefix(".venv/bin/") for w in words]
        if words[:3] == ["python", "-m", "mmfast"]:
            words = ["mmfast", *words[3:]]
        if words:
            commands.append(Command(text, env, tuple(words)))
    return commands


def classify(command: Command) -> str | None:
    """None: run it; else the reason it is skipped. Raises for a command nobody has
    classified, so a new README command gets a decision."""
    if command.words[0] == "mmfast" and CHEAP_WORDS.intersection(command.words[1:]):
        return None
    for prefix, reason in SKIPPED_COMMANDS.items():
        if command.words[:len(prefix)] == prefix:
            return reason
    raise ValueError(f"README command {command.text!r} is neither cheap nor in SKIPPED_COMMANDS: "
                     "add it there with the reason, or make it cheap")


def user_environment() -> dict:
    """This process's environment without the test suite's settings (conftest sets
    TRITON_INTERPRET and MMFAST_ switches), the hub offline."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET" and not k.startswith("MMFAST_")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return env


BLOCKS = fenced_blocks(README.read_text())
PYTHON_BLOCKS = [b for b in BLOCKS if b.language == "python"]
SHELL_COMMANDS = [(b, c) for b in BLOCKS if b.language == "bash" for c in shell_commands(b.code)]


def test_every_block_names_a_known_language():
    unknown = [f"line {b.line}: {b.language or '(none)'}" for b in BLOCKS if b.language not in LANGUAGES]
    assert not unknown, f"README blocks must be one of {LANGUAGES} ('text' for output): {unknown}"


def test_skip_markers_are_few_and_each_on_a_block():
    markers = len(ANY_MARKER.findall(README.read_text()))
    skipped = [b for b in BLOCKS if b.skip]
    assert markers == len(skipped), "a readme-test marker is malformed or not right above a fenced block"
    assert len(skipped) <= MAX_MARKED_SKIPS, (
        f"{len(skipped)} README blocks skipped (at most {MAX_MARKED_SKIPS}): make them run on a CPU with a tiny "
        f"model instead: {[(b.line, b.skip) for b in skipped]}")


def test_the_readme_has_snippets_to_run():
    assert len(PYTHON_BLOCKS) >= 3 and any(classify(c) is None for _, c in SHELL_COMMANDS)


def runnable_jobs() -> list[dict]:
    """What tests/readme_runner.py runs: the python blocks and the cheap commands."""
    jobs = [{"id": f"python:{b.line}", "line": b.line, "code": b.code} for b in PYTHON_BLOCKS if not b.skip]
    jobs += [{"id": command_id(b, c), "argv": list(c.words[1:]), "env": c.env}
             for b, c in SHELL_COMMANDS if not b.skip and classify(c) is None]
    return jobs


def command_id(block: Block, command: Command) -> str:
    return f"bash:{block.line}:{command.text}"


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    pytest.importorskip("transformers", reason="the README's snippets use transformers (mmfast[hf])")
    folder = tmp_path_factory.mktemp("readme")
    (folder / "jobs.json").write_text(json.dumps(runnable_jobs()))
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "readme_runner.py"), str(ROOT),
                           str(folder / "jobs.json"), str(folder / "results.json")],
                          cwd=ROOT, env=user_environment(), capture_output=True, text=True,
                          timeout=RUNNER_TIMEOUT_S)
    assert done.returncode == 0, f"the snippet runner failed:\n{done.stdout}\n{done.stderr}"
    return json.loads((folder / "results.json").read_text())


@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=lambda b: f"line{b.line}")
def test_python_snippet_runs(block, results):
    if block.skip:
        pytest.skip(f"README.md line {block.line} is marked: {block.skip}")
    result = results[f"python:{block.line}"]
    assert result["ok"], f"README.md's snippet at line {block.line} failed:\n{result['output'][-6000:]}"


@pytest.mark.parametrize(("block", "command"), SHELL_COMMANDS,
                         ids=[f"line{b.line}:{' '.join(c.words[:3])}" for b, c in SHELL_COMMANDS])
def test_shell_command(block, command, request):
    if block.skip:
        pytest.skip(f"README.md line {block.line} is marked: {block.skip}")
    reason = classify(command)
    if reason is not None:
        pytest.skip(f"{command.text!r}: {reason}")
    result = request.getfixturevalue("results")[command_id(block, command)]
    assert result["ok"], f"README.md line {block.line}: {command.text!r} failed:\n{result['output'][-6000:]}"


# ---- the machinery itself ----------------------------------------------------------------


SAMPLE = """Intro
```python
print(1)
```
<!-- readme-test: skip (needs a local checkpoint directory) -->

```bash
FOO=1 .venv/bin/mmfast bench --list   # cheap
mmfast profile vlm \\
    --preset tiny
```
```
untagged
```
"""


def test_fenced_blocks_reads_languages_markers_and_lines():
    blocks = fenced_blocks(SAMPLE)
    assert [(b.line, b.language, b.skip) for b in blocks] == [
        (2, "python", None), (7, "bash", "needs a local checkpoint directory"), (12, "", None)]
    assert blocks[0].code == "print(1)\n"
    with pytest.raises(ValueError, match="never closed"):
        fenced_blocks("```python\nprint(1)\n")


def test_shell_commands_are_parsed_and_classified():
    listed, profile = shell_commands(fenced_blocks(SAMPLE)[1].code)
    assert listed.env == {"FOO": "1"} and listed.words == ("mmfast", "bench", "--list")
    assert classify(listed) is None
    assert profile.words == ("mmfast", "profile", "vlm", "--preset", "tiny")
    assert "minutes" in classify(profile)
    assert classify(shell_commands("python -m mmfast info --json")[0]) is None
    with pytest.raises(ValueError, match="SKIPPED_COMMANDS"):
        classify(shell_commands("rm -rf build")[0])
