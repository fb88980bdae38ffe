"""The configuration examples of Rekkord's "Configure repository" page, as
written there: fed to the parser, then used for real (init, derive, save) on
a local folder, SeaweedFS (S3) and OpenSSH (SFTP), with the local servers'
addresses put where the page has placeholders. Also: a host that ignores
conditional writes never gets an object overwritten, and docs/backends.md
agrees with the page's table of providers."""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
from collections import Counter
from pathlib import Path

import pytest

from rekkordfs.config import LocalLocation, S3Location, SFTPLocation, load_config, parse_url
from tests.conftest import REKKORD, ROOT
from tests.servers import BUCKET, OpenSSHServer, SeaweedFS
from tests.test_storage_conformance import s3_proxy

ACCOUNT = "0123456789abcdef0123456789abcdef"
SPEC_FINGERPRINT = "SHA256:Y9pmJfkaok8t0dFJrfi8/LLUNhOYwAZGHUNGsYAiJUM"


def ini(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o600)
    return path


# --- the page's examples, parsed ----------------------------------------------------------

# The provider table, placeholders filled: URL -> (endpoint, bucket, region, path style)
PROVIDERS = [
    ("https://my-backups.s3.eu-west-3.amazonaws.com",
     S3Location("https://s3.eu-west-3.amazonaws.com", "my-backups", "", "eu-west-3", False)),
    ("https://s3.eu-west-3.amazonaws.com/my-backups",
     S3Location("https://s3.eu-west-3.amazonaws.com", "my-backups", "", "eu-west-3", True)),
    ("https://s3.us-west-004.backblazeb2.com/my-backups",
     S3Location("https://s3.us-west-004.backblazeb2.com", "my-backups", "", "us-west-004", True)),
    (f"https://{ACCOUNT}.r2.cloudflarestorage.com/my-backups",
     S3Location(f"https://{ACCOUNT}.r2.cloudflarestorage.com", "my-backups", "", "auto", True)),
    ("https://sos-ch-gva-2.exo.io/my-backups",
     S3Location("https://sos-ch-gva-2.exo.io", "my-backups", "", "ch-gva-2", True)),
    ("https://my-backups.s3.fr-par.scw.cloud",
     S3Location("https://s3.fr-par.scw.cloud", "my-backups", "", "fr-par", False)),
]


@pytest.mark.parametrize("url, expected", PROVIDERS, ids=[u for u, _ in PROVIDERS])
def test_provider_urls(url: str, expected: S3Location) -> None:
    assert parse_url(url) == expected


def test_s3_example(tmp_path: Path) -> None:
    config = load_config(config_file=str(ini(tmp_path / "s3.ini", """\
[Repository]
URL = https://minio.example.org/my-backups

[S3]
AccessKeyID = AKIAIOSFODNN7EXAMPLE
SecretKey = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY
""")), env={})
    assert config.location == S3Location("https://minio.example.org", "my-backups", "", None, True)
    assert (config.s3.key_id, config.s3.secret_key) == ("AKIAIOSFODNN7EXAMPLE",
                                                        "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")
    # SecretKey may be left out (asked for on a terminal); KeyID is the older name of AccessKeyID
    config = load_config(config_file=str(ini(tmp_path / "s3b.ini", """\
[Repository]
URL = https://minio.example.org/my-backups

[S3]
KeyID = AKIAIOSFODNN7EXAMPLE
""")), env={})
    assert (config.s3.key_id, config.s3.secret_key) == ("AKIAIOSFODNN7EXAMPLE", None)


def test_sftp_examples(tmp_path: Path) -> None:
    both = load_config(config_file=str(ini(tmp_path / "a.ini", """\
[Repository]
URL = backup@nas.example.com:/path/to/repository

[SFTP]
Password = hunter2
KeyFile = /home/bar/.ssh/id_ed25519
""")), env={})
    assert both.location == SFTPLocation("backup", "nas.example.com", None, "/path/to/repository")
    assert (both.sftp.password, both.sftp.key_file) == ("hunter2", "/home/bar/.ssh/id_ed25519")

    pinned = load_config(config_file=str(ini(tmp_path / "b.ini", f"""\
[Repository]
URL = foo@example.com:/backup

[SFTP]
KeyFile = /home/bar/.ssh/id_ed25519
Fingerprint = {SPEC_FINGERPRINT}
""")), env={})
    assert pinned.location == SFTPLocation("foo", "example.com", None, "/backup")
    assert pinned.sftp.fingerprint == SPEC_FINGERPRINT

    keyed = load_config(config_file=str(ini(tmp_path / "c.ini", f"""\
[Repository]
URL = ssh://foo@example.com/backup
KeyFile = write.key

[SFTP]
KeyFile = id_ed25519
Fingerprint = {SPEC_FINGERPRINT}
""")), env={})
    assert keyed.location == SFTPLocation("foo", "example.com", None, "/backup")
    assert keyed.key_file == str(tmp_path / "write.key")  # relative to the config file
    assert keyed.sftp.key_file == str(tmp_path / "id_ed25519")


def test_local_example(tmp_path: Path) -> None:
    config = load_config(config_file=str(ini(tmp_path / "l.ini", "[Repository]\nURL = /path/to/repository\n")),
                         env={})
    assert config.location == LocalLocation("/path/to/repository")


# --- the page's commands, for real ---------------------------------------------------------


def rekkord(*args: str, cwd: Path, config: Path | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """rekkord as the page runs it: REKKORD_CONFIG_FILE exported, or -C given."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "REKKORD_CACHE_DIR": str(cwd / "cache")}
    env.pop("REKKORD_CONFIG_FILE", None)
    if config is not None:
        env["REKKORD_CONFIG_FILE"] = str(config)
    result = subprocess.run([*REKKORD, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=600)
    if check:
        assert result.returncode == 0, f"rekkord {' '.join(args)}: {result.stderr}"
    return result


def walk_through_the_page(tmp_path: Path, url: str, sections: str) -> None:
    """Initialize as the page says, derive the two example keys, save with a
    config naming write.key, and list with the ReadWrite key."""
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "file.txt").write_text("saved through the documented configuration\n")
    config = ini(tmp_path / "config.ini", f"[Repository]\nURL = {url}\n\n{sections}")

    created = rekkord("init", cwd=tmp_path, config=config)  # export REKKORD_CONFIG_FILE=...; rekkord init
    assert "Repository created" in created.stdout and (tmp_path / "master.key").is_file()
    rekkord("derive", "-K", "master.key", "-t", "ReadWrite", "-O", "readwrite.key", cwd=tmp_path, config=config)
    rekkord("derive", "-K", "master.key", "-t", "WriteOnly", "-O", "write.key", cwd=tmp_path, config=config)

    with_key = ini(tmp_path / "with-key.ini", f"[Repository]\nURL = {url}\nKeyFile = write.key\n\n{sections}")
    snapshot = rekkord("save", "laptop", str(src), cwd=tmp_path, config=with_key).stdout.splitlines()[-1]
    listed = json.loads(rekkord("-C", str(config), "-K", "readwrite.key", "snapshots", "-f", "json",
                                cwd=tmp_path).stdout)
    assert [s["id"] for s in listed] == [snapshot]
    rekkord("-C", str(config), "-K", "readwrite.key", "restore", f"laptop:{src}", str(tmp_path / "out"),
            cwd=tmp_path)
    assert (tmp_path / "out" / "sub" / "file.txt").read_text() == (src / "sub" / "file.txt").read_text()

    # the alternative the page gives: rekkord init -C /path/to/config.ini, --key_file to choose the file
    again = tmp_path / "again"
    again.mkdir()
    other = ini(again / "config.ini", f"[Repository]\nURL = {url}-again\n\n{sections}")
    rekkord("init", "-C", str(other), "--key_file", "other.key", cwd=again)
    assert (again / "other.key").is_file() and not (again / "master.key").exists()


def test_page_walkthrough_local(tmp_path: Path) -> None:
    walk_through_the_page(tmp_path, str(tmp_path / "repository"), "")


def test_page_walkthrough_s3(seaweedfs_server: SeaweedFS, tmp_path: Path) -> None:
    url = seaweedfs_server.url(BUCKET, f"spec-{secrets.token_hex(4)}")  # https://<endpoint>/<bucket>[/prefix]
    walk_through_the_page(tmp_path, url, f"""\
[S3]
AccessKeyID = {seaweedfs_server.access_key}
SecretKey = {seaweedfs_server.secret_key}
""")


def _sftp_folder(server: OpenSSHServer) -> Path:
    return server.new_dir(f"spec-{secrets.token_hex(4)}")


def test_page_walkthrough_sftp_scp_form(sshd_server: OpenSSHServer, tmp_path: Path) -> None:
    """URL = <user>@<host>:/path, KeyFile and Fingerprint (the port of the test
    server has no place in this form: [SFTP] Port gives it)."""
    folder = _sftp_folder(sshd_server)
    sshd_server.new_dir(folder.name + "-again")
    walk_through_the_page(tmp_path, f"{sshd_server.user}@127.0.0.1:{folder}", f"""\
[SFTP]
KeyFile = {sshd_server.client_key}
Fingerprint = {sshd_server.fingerprint}
Port = {sshd_server.port}
""")


def test_page_walkthrough_sftp_ssh_url_and_password(sshd_server: OpenSSHServer, tmp_path: Path) -> None:
    """URL = ssh://user@host/path (with the test server's port), Password."""
    folder = _sftp_folder(sshd_server)
    sshd_server.new_dir(folder.name + "-again")
    walk_through_the_page(tmp_path, f"ssh://{sshd_server.user}@127.0.0.1:{sshd_server.port}{folder}", f"""\
[SFTP]
Password = {sshd_server.password}
Fingerprint = {sshd_server.fingerprint}
""")


def test_omitted_secrets_without_a_terminal(seaweedfs_server: SeaweedFS, sshd_server: OpenSSHServer,
                                            tmp_path: Path) -> None:
    """The page lets SecretKey, or both SFTP Password and KeyFile, be left out
    (a prompt asks for them); without a terminal that is one clear line."""
    home = tmp_path / "home"  # no default SSH keys to fall back on
    home.mkdir()
    cases = [
        (f"{seaweedfs_server.url(BUCKET, 'nosecret')}", f"[S3]\nAccessKeyID = {seaweedfs_server.access_key}\n",
         "S3 secret key for key ID"),
        (f"{sshd_server.user}@127.0.0.1:{_sftp_folder(sshd_server)}",
         f"[SFTP]\nFingerprint = {sshd_server.fingerprint}\nPort = {sshd_server.port}\n",
         "no password or key file set"),
    ]
    for url, sections, fragment in cases:
        config = ini(tmp_path / "config.ini", f"[Repository]\nURL = {url}\n\n{sections}")
        env = {**os.environ, "PYTHONPATH": str(ROOT), "REKKORD_CACHE_DIR": str(tmp_path / "cache"),
               "REKKORD_CONFIG_FILE": str(config), "HOME": str(home)}
        env.pop("SSH_AUTH_SOCK", None)
        result = subprocess.run([*REKKORD, "init"], capture_output=True, text=True, cwd=tmp_path, env=env,
                                stdin=subprocess.DEVNULL, timeout=120)
        assert result.returncode == 1 and "Traceback" not in result.stderr
        assert len(result.stderr.splitlines()) == 1 and fragment in result.stderr, result.stderr
        assert not (tmp_path / "master.key").exists()


# --- hosts without conditional writes ------------------------------------------------------


def test_host_ignoring_conditional_writes_never_overwrites(seaweedfs_server: SeaweedFS, tmp_path: Path) -> None:
    """Behind a proxy that drops If-None-Match (like Backblaze B2 or Scaleway),
    init, saves with several keys and empty caches, and check: no object is
    ever written twice (but the probe that detects the host's behaviour)."""
    src = tmp_path / "src"
    src.mkdir()
    for i in range(6):
        (src / f"f{i}").write_bytes(os.urandom(400_000))
    (src / "small").write_text("small\n")
    prefix = f"nocond-{secrets.token_hex(4)}"
    with s3_proxy(seaweedfs_server) as proxy:
        proxy.ignore_if_none_match = True
        config = ini(tmp_path / "config.ini", f"""\
[Repository]
URL = {proxy.endpoint}/{BUCKET}/{prefix}

[S3]
AccessKeyID = {seaweedfs_server.access_key}
SecretKey = {seaweedfs_server.secret_key}
""")
        rekkord("init", cwd=tmp_path, config=config)
        rekkord("derive", "-K", "master.key", "-t", "WriteOnly", "-O", "write.key", cwd=tmp_path, config=config)
        for key, cache in (("master.key", "c1"), ("write.key", "c2"), ("master.key", "c3"), ("write.key", "c3")):
            env_cache = tmp_path / cache
            env_cache.mkdir(exist_ok=True)
            result = subprocess.run([*REKKORD, "-K", key, "save", "docs", str(src)], capture_output=True, text=True,
                                    cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT),
                                                       "REKKORD_CONFIG_FILE": str(config),
                                                       "REKKORD_CACHE_DIR": str(env_cache)})
            assert result.returncode == 0, result.stderr
            (src / "small").write_text(f"changed by {key} {cache}\n")
        assert "No problems found" in rekkord("-K", "master.key", "check", "--read-data", cwd=tmp_path,
                                              config=config).stdout
        written = Counter(path for path in proxy.puts(f"/{BUCKET}/{prefix}/")
                          if not path.endswith("/rekkord.probe"))
        assert written and max(written.values()) == 1, [p for p, n in written.items() if n > 1]
        assert any("/packs/" in p for p in written) and any("/tags/" in p for p in written)


# --- the documentation --------------------------------------------------------------------

# The page's table: provider -> honours conditional writes
SPEC_CONDITIONAL_WRITES = {
    "Amazon S3 (virtual-host style)": "Yes", "Amazon S3 (path style)": "Yes", "Backblaze B2": "No",
    "Cloudflare R2": "Yes", "Exoscale Object Storage": "Yes", "Scaleway Object Storage": "No",
}


def test_backends_doc_agrees_with_the_provider_table() -> None:
    text = (ROOT / "docs" / "backends.md").read_text()
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and cells[0] in SPEC_CONDITIONAL_WRITES:
            rows[cells[0]] = cells[-1]
    assert rows == SPEC_CONDITIONAL_WRITES
    section = text[text.index("### Conditional writes"):]
    honouring = section[:section.index(".")]  # the first sentence names the hosts that honour the header
    assert "Backblaze" not in honouring and "Scaleway" not in honouring, honouring
