"""The command line as a Rekkord, restic or borg user expects it: one option
style, options before or after the command, -f meaning --format everywhere,
--version, -q, -v, counts in words, dry-run wording, helpful ID errors,
per-command help with an example, shell completion and packaging."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from rekkordfs import __version__
from rekkordfs.cli.output import plural
from tests.conftest import REKKORD, ROOT, Rekkord
from tests.fsutil import assert_one_line_error

COMMANDS = ["init", "derive", "identify", "save", "snapshots", "channels", "list", "diff", "dump", "find", "stats",
            "restore", "check", "forget", "prune", "mount", "commit", "completion"]
FORMAT_COMMANDS = ["init", "derive", "identify", "save", "snapshots", "channels", "list", "diff", "find", "stats",
                   "restore", "check", "forget", "prune", "commit"]


def run(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    environment.pop("REKKORD_CONFIG_FILE", None)
    return subprocess.run([*REKKORD, *args], capture_output=True, text=True, cwd=cwd, env=environment, timeout=300)


@pytest.fixture
def saved(local_repo: Rekkord, tmp_path: Path) -> tuple[Rekkord, Path, str]:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "one.txt").write_text("one\n")
    (src / "sub" / "two.txt").write_text("two\n")
    (src / "link").symlink_to("one.txt")
    return local_repo, src, local_repo.save("docs", str(src))


# --- the option style ------------------------------------------------------------------


def test_version() -> None:
    result = run("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"rekkord (rekkordfs) {__version__}"


def test_common_options_before_or_after_with_every_spelling(saved: tuple[Rekkord, Path, str],
                                                             tmp_path: Path) -> None:
    rekkord, _, snapshot = saved
    repo, key = str(rekkord.repository), str(rekkord.key_file)
    config = tmp_path / "rekkord.ini"
    config.write_text(f"[Repository]\nURL = {repo}\n")
    cache = {"REKKORD_CACHE_DIR": str(rekkord.cache_dir)}
    forms = [
        ["-R", repo, "--key-file", key, "snapshots"],  # restic's spelling before the command
        ["snapshots", "--key-file", key, "--repository", repo],
        ["--key_file", key, "-R", repo, "snapshots"],  # the spec's spelling
        ["snapshots", "--key_file", key, "-R", repo],
        ["--config-file", str(config), "-K", key, "snapshots"],
        ["snapshots", "--config_file", str(config), "-K", key],
        ["-C", str(config), "snapshots", "-K", key, "-j", "2"],
    ]
    for form in forms:
        result = run(*form, "-f", "json", env=cache)
        assert result.returncode == 0, (form, result.stderr)
        assert [s["id"] for s in json.loads(result.stdout)] == [snapshot], form


def test_init_key_file_spellings_and_default(tmp_path: Path) -> None:
    cache = {"REKKORD_CACHE_DIR": str(tmp_path / "cache")}
    assert run("-R", str(tmp_path / "a"), "init", cwd=tmp_path, env=cache).returncode == 0
    assert (tmp_path / "master.key").is_file()  # the default, in the current folder
    assert run("-R", str(tmp_path / "b"), "init", "--key_file", "b.key", cwd=tmp_path, env=cache).returncode == 0
    assert run("--key-file", "c.key", "-R", str(tmp_path / "c"), "init", cwd=tmp_path, env=cache).returncode == 0
    assert (tmp_path / "b.key").is_file() and (tmp_path / "c.key").is_file()
    quiet = run("-R", str(tmp_path / "d"), "init", "-q", "-K", "d.key", cwd=tmp_path, env=cache)
    assert quiet.returncode == 0 and quiet.stdout == "" and quiet.stderr == ""
    as_json = json.loads(run("-R", str(tmp_path / "e"), "init", "-f", "json", "-K", "e.key", cwd=tmp_path,
                             env=cache).stdout)
    assert as_json["key_file"] == "e.key" and as_json["type"] == "Master" and len(as_json["key_id"]) == 32


def test_f_is_format_in_every_command_that_has_it() -> None:
    for command in FORMAT_COMMANDS:
        text = run(command, "--help").stdout
        assert re.search(r"-f \{plain,json\}, --format \{plain,json\}", text), command
        refused = run(command, "-f", "xml")
        assert refused.returncode == 2 and "invalid choice: 'xml'" in refused.stderr, command
    for command in ("mount", "dump"):  # mount's output is a filesystem, dump's the data itself
        assert not re.search(r"^\s+-f\b", run(command, "--help").stdout, re.MULTILINE), command
    assert "--force" in run("restore", "--help").stdout and "--foreground" in run("mount", "--help").stdout


def test_letters_mean_one_thing() -> None:
    """-n is --dry-run, -v --verbose, -q --quiet wherever they exist."""
    meanings = {"-n": "--dry-run", "-v": "--verbose", "-q": "--quiet", "-f": "--format", "-K": "--key-file",
                "-C": "--config-file", "-R": "--repository", "-j": "--threads"}
    for command in COMMANDS:
        text = run(command, "--help").stdout
        for letter, long in meanings.items():
            found = re.findall(rf"^\s+{letter}(?: [A-Z{{][^,]*)?, (--[a-z-]+)", text, re.MULTILINE)
            assert all(name == long for name in found), (command, letter, found)


def test_each_help_lists_its_options_and_ends_with_an_example() -> None:
    for command in COMMANDS:
        result = run(command, "--help")
        assert result.returncode == 0
        example = result.stdout.rstrip().split("example:\n")[-1]
        assert "example:" in result.stdout and example.strip().splitlines()[0].lstrip().startswith(
            ("rekkord ", "source ", "pg_dump ")), command
        assert "--key_file" not in result.stdout and "--config_file" not in result.stdout  # hidden aliases
    commit = run("commit", "--help").stdout
    for option in ("--key-file", "--repository", "--config-file", "--threads", "--verbose"):
        assert option not in commit
    derive = run("derive", "--help").stdout
    assert "--repository" not in derive and "--threads" not in derive
    usage = " ".join(run("mount", "--help").stdout.split("\n\n")[0].split())
    assert usage.endswith("[SNAPSHOT[:PATH]] MNT"), usage  # one mount per command
    assert run().returncode == 2


def test_abbreviations_are_refused(saved: tuple[Rekkord, Path, str]) -> None:
    rekkord = saved[0]
    assert_one_line_error(rekkord("snapshots", "--form", "json", check=False), "unrecognized arguments")


# --- what commands say ------------------------------------------------------------------


def test_counts_in_words() -> None:
    assert [plural(n, "file") for n in (0, 1, 2)] == ["0 files", "1 file", "2 files"]
    assert [plural(n, "directory") for n in (1, 3)] == ["1 directory", "3 directories"]
    assert [plural(n, "entry") for n in (1, 3)] == ["1 entry", "3 entries"]
    assert plural(1, "problem") == "1 problem"


def test_restore_options_and_wording(saved: tuple[Rekkord, Path, str], tmp_path: Path) -> None:
    rekkord, src, snapshot = saved
    dest = tmp_path / "dest"
    verbose = rekkord("restore", "-v", f"{snapshot}:{src}", str(dest))
    assert set(verbose.stdout.splitlines()[:-1]) == {
        f"restored {dest / name}" for name in ("one.txt", "sub", "sub/two.txt", "link")}
    assert verbose.stdout.splitlines()[-1] == "Restored 2 files (8 B), 1 directory, 1 symlink"

    (dest / "extra").write_text("not in the snapshot\n")
    dry = rekkord("restore", "-n", "--delete", f"{snapshot}:{src}", str(dest)).stdout.splitlines()
    assert f"would delete {dest / 'extra'}" in dry and f"would restore {dest / 'one.txt'}" in dry
    assert dry[-1] == "Would restore 2 files (8 B), 1 directory, 1 symlink; would delete 1 entry"
    assert (dest / "extra").exists()
    refused = rekkord("restore", f"{snapshot}:{src}", str(dest), check=False)
    assert_one_line_error(refused, "not empty", "--force")
    deleting = rekkord("restore", "-v", "--delete", f"{snapshot}:{src}", str(dest)).stdout.splitlines()
    assert f"deleted {dest / 'extra'}" in deleting and deleting[-1].endswith("; deleted 1 entry")
    assert not (dest / "extra").exists()

    quiet = rekkord("restore", "-q", "--force", f"{snapshot}:{src}", str(dest))
    assert quiet.stdout == "" and quiet.stderr == ""
    document = json.loads(rekkord("restore", "-f", "json", "--force", f"{snapshot}:{src}", str(dest)).stdout)
    assert (document["files"], document["directories"], document["symlinks"], document["dry_run"]) == (2, 1, 1, False)
    assert_one_line_error(rekkord("restore", "-f", f"{snapshot}:{src}", str(tmp_path / "x"), check=False),
                          "--format")


def test_check_wording_and_quiet(saved: tuple[Rekkord, Path, str]) -> None:
    rekkord = saved[0]
    summary, verdict = rekkord("check").stdout.splitlines()
    assert re.fullmatch(r"Checked 1 snapshot, \d+ directories, 2 files, \d+ chunks?", summary), summary
    assert verdict == "No problems found"
    quiet = rekkord("check", "-q")
    assert quiet.stdout == "" and quiet.stderr == ""
    for pack in Path(str(rekkord.repository), "packs").rglob("*"):
        if pack.is_file():
            pack.unlink()
    damaged = rekkord("check", check=False)
    assert damaged.returncode == 1
    assert re.fullmatch(r"\d+ problems? found", damaged.stderr.splitlines()[-1])
    count = int(damaged.stderr.splitlines()[-1].split()[0])
    assert damaged.stderr.splitlines()[-1] == f"{plural(count, 'problem')} found"
    assert len([line for line in damaged.stderr.splitlines() if line.startswith("problem: ")]) == count
    quiet_damaged = rekkord("check", "-q", check=False)  # problems are the result: -q keeps them
    assert quiet_damaged.returncode == 1
    assert sorted(quiet_damaged.stderr.splitlines()) == sorted(damaged.stderr.splitlines())


def test_id_prefix_errors(saved: tuple[Rekkord, Path, str], tmp_path: Path) -> None:
    rekkord, _, snapshot = saved
    for name in (snapshot[:7], "docz"):
        line = assert_one_line_error(rekkord("list", name, check=False))
        assert f"'{name}'" in line and "at least 8 hex digits" in line
    line = assert_one_line_error(rekkord("restore", "0123456789abcdef", str(tmp_path / "x"), check=False))
    assert "no snapshot or channel named '0123456789abcdef'" in line
    assert rekkord("list", snapshot[:8]).returncode == 0 and rekkord("list", "docs").returncode == 0


def test_derive_and_identify_output(local_repo: Rekkord, tmp_path: Path) -> None:
    document = json.loads(local_repo("derive", "-t", "logonly", "-O", str(tmp_path / "log.key"), "-f", "json").stdout)
    assert document["type"] == "LogOnly" and document["key_file"] == str(tmp_path / "log.key")
    assert json.loads(local_repo("identify", "-f", "json", key=str(tmp_path / "log.key")).stdout)["id"] == \
        document["key_id"]
    quiet = local_repo("derive", "-q", "-t", "WriteOnly", "-O", str(tmp_path / "w.key"))
    assert quiet.stdout == "" and (tmp_path / "w.key").is_file()


# --- shell completion -------------------------------------------------------------------


def _bash_complete(line: str) -> list[str]:
    """What bash would offer after `line` (completing its last word)."""
    script = f"""
source <({' '.join(REKKORD)} completion bash)
COMP_LINE={line!r}
read -r -a COMP_WORDS <<< "$COMP_LINE"
[[ $COMP_LINE == *" " ]] && COMP_WORDS+=("")
COMP_CWORD=$(( ${{#COMP_WORDS[@]}} - 1 ))
_rekkord
printf '%s\\n' "${{COMPREPLY[@]}}"
"""
    result = subprocess.run(["bash", "-c", script], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    return sorted(filter(None, result.stdout.splitlines()))


def test_bash_completion() -> None:
    loaded = subprocess.run(["bash", "-c", f"source <({' '.join(REKKORD)} completion bash) && complete -p rekkord"],
                            capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert loaded.returncode == 0 and "-F _rekkord rekkord" in loaded.stdout, loaded.stderr
    assert _bash_complete("rekkord sa") == ["save"]
    assert _bash_complete("rekkord -K master.key re") == ["restore"]
    assert _bash_complete("rekkord save --exc") == ["--exclude", "--exclude-caches", "--exclude-file"]
    assert _bash_complete("rekkord snapshots -f ") == ["json", "plain"]
    assert _bash_complete("rekkord derive -t ") == ["LogOnly", "ReadWrite", "WriteOnly"]
    assert _bash_complete("rekkord completion ") == ["bash", "zsh"]
    assert "--force" in _bash_complete("rekkord restore --") and "--foreground" not in _bash_complete(
        "rekkord restore --")
    assert "README.md" in _bash_complete("rekkord save laptop READ")
    assert "--key_file" not in _bash_complete("rekkord --")


def _zsh_complete(line: str, expected: str, timeout: float = 60) -> str:
    """Type `line` and Tab in an interactive zsh; the screen once `expected` shows."""
    script = f"""
zmodload zsh/zpty
zpty z 'PS1="> " TERM=dumb zsh -f -i'
zpty -w z 'autoload -U compinit; compinit -u -D; source <({' '.join(REKKORD)} completion zsh)'
zpty -w -n z {line!r}$'\\t'
screen=""
for i in {{1..{int(timeout * 10)}}}; do
  while zpty -r -t z chunk; do screen+=$chunk; done
  [[ $screen == *{expected!r}* ]] && break
  sleep 0.1
done
zpty -d z
print -r -- "$screen"
"""
    result = subprocess.run(["zsh", "-f", "-c", script], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT)
    return result.stdout


def test_zsh_completion() -> None:
    loaded = subprocess.run(["zsh", "-f", "-c", f"autoload -U compinit; compinit -u -D; "
                             f"source <({' '.join(REKKORD)} completion zsh); print -r -- $_comps[rekkord]"],
                            capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert loaded.returncode == 0 and loaded.stdout.strip() == "_rekkord", loaded.stderr
    assert "rekkord save" in _zsh_complete("rekkord sa", "rekkord save")
    options = _zsh_complete("rekkord save --exc", "--exclude-file")
    assert "--exclude-caches" in options and "--exclude-file" in options
    assert "WriteOnly" in _zsh_complete("rekkord derive -t ", "WriteOnly")


# --- packaging and start-up ---------------------------------------------------------------


def test_commit_starts_without_the_library() -> None:
    """`commit` only talks to a running mount: it must not pay for trio and the rest."""
    probe = ("import sys\nfrom rekkordfs.cli.main import main\ncode = main(['commit', '/nonexistent'])\n"
             "print(code, sorted(m for m in ('trio', 'boto3', 'botocore', 'asyncssh', 'nacl', 'rekkordfs.format')"
             " if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.stdout.strip() == "2 []", result.stdout + result.stderr  # 2: a usage error


def test_the_distribution_holds_only_rekkordfs(tmp_path: Path) -> None:
    """A wheel built from the project installs one top-level package and the
    `rekkord` script pointing into it. (Built from a copy: setuptools writes
    build/ and egg-info next to the sources.)"""
    import shutil
    import zipfile

    source = tmp_path / "project"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".venv", ".git", "__pycache__", "*.egg-info",
                                                                "build", ".pytest_cache"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path / "dist"),
                    str(source)], check=True, capture_output=True, cwd=tmp_path)
    wheel = zipfile.ZipFile(next((tmp_path / "dist").glob("rekkordfs-*.whl")))
    tops = {name.split("/")[0] for name in wheel.namelist()}
    assert tops == {"rekkordfs", f"rekkordfs-{__version__}.dist-info"}
    entry_points = next(n for n in wheel.namelist() if n.endswith("entry_points.txt"))
    assert "rekkord = rekkordfs.cli.main:main" in wheel.read(entry_points).decode()
    assert "rekkordfs/cli/main.py" in wheel.namelist() and "rekkordfs/storage/s3.py" in wheel.namelist()
