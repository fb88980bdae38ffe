"""Repository URL parsing and configuration loading (INI + environment + command line)."""

from __future__ import annotations

from pathlib import Path

import pytest

from rekkordfs import config as configmod
from rekkordfs.config import LocalLocation, S3Location, SFTPLocation, load_config, parse_url
from rekkordfs.errors import ConfigError

ACCOUNT = "0123456789abcdef0123456789abcdef"
FINGERPRINT = "SHA256:" + "A" * 43


# --- local paths -------------------------------------------------------------------


@pytest.mark.parametrize(
    "url, path",
    [
        ("repo", "repo"),
        ("./backups/repo", "./backups/repo"),
        ("../repo", "../repo"),
        ("/srv/backup", "/srv/backup"),
        ("/srv/with:colon", "/srv/with:colon"),
        ("rel/with:colon", "rel/with:colon"),
        ("  /srv/backup  ", "/srv/backup"),
        ("file:///srv/backup", "/srv/backup"),
        ("file://localhost/srv/backup", "/srv/backup"),
        ("file:///srv/with%20space", "/srv/with space"),
    ],
)
def test_local_paths(url: str, path: str) -> None:
    assert parse_url(url) == LocalLocation(path)


# --- S3 --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url, expected",
    [
        # AWS, virtual-host style
        ("https://mybucket.s3.eu-west-3.amazonaws.com/backups/laptop",
         S3Location("https://s3.eu-west-3.amazonaws.com", "mybucket", "backups/laptop", "eu-west-3", False)),
        ("https://mybucket.s3.eu-west-3.amazonaws.com",
         S3Location("https://s3.eu-west-3.amazonaws.com", "mybucket", "", "eu-west-3", False)),
        ("https://mybucket.s3.eu-west-3.amazonaws.com/",
         S3Location("https://s3.eu-west-3.amazonaws.com", "mybucket", "", "eu-west-3", False)),
        ("https://mybucket.s3-eu-west-1.amazonaws.com/p",
         S3Location("https://s3-eu-west-1.amazonaws.com", "mybucket", "p", "eu-west-1", False)),
        ("https://mybucket.s3.amazonaws.com/p",
         S3Location("https://s3.amazonaws.com", "mybucket", "p", "us-east-1", False)),
        # AWS, path style
        ("https://s3.eu-west-3.amazonaws.com/mybucket/backups/laptop",
         S3Location("https://s3.eu-west-3.amazonaws.com", "mybucket", "backups/laptop", "eu-west-3", True)),
        ("https://s3.eu-west-3.amazonaws.com/mybucket",
         S3Location("https://s3.eu-west-3.amazonaws.com", "mybucket", "", "eu-west-3", True)),
        ("https://s3.amazonaws.com/mybucket/p",
         S3Location("https://s3.amazonaws.com", "mybucket", "p", "us-east-1", True)),
        # Backblaze B2
        ("https://mybucket.s3.us-west-004.backblazeb2.com",
         S3Location("https://s3.us-west-004.backblazeb2.com", "mybucket", "", "us-west-004", False)),
        ("https://mybucket.s3.us-west-004.backblazeb2.com/pre/fix",
         S3Location("https://s3.us-west-004.backblazeb2.com", "mybucket", "pre/fix", "us-west-004", False)),
        ("https://s3.us-west-004.backblazeb2.com/mybucket",
         S3Location("https://s3.us-west-004.backblazeb2.com", "mybucket", "", "us-west-004", True)),
        # Cloudflare R2
        (f"https://{ACCOUNT}.r2.cloudflarestorage.com/mybucket",
         S3Location(f"https://{ACCOUNT}.r2.cloudflarestorage.com", "mybucket", "", "auto", True)),
        (f"https://{ACCOUNT}.r2.cloudflarestorage.com/mybucket/pre",
         S3Location(f"https://{ACCOUNT}.r2.cloudflarestorage.com", "mybucket", "pre", "auto", True)),
        (f"https://mybucket.{ACCOUNT}.r2.cloudflarestorage.com/pre",
         S3Location(f"https://{ACCOUNT}.r2.cloudflarestorage.com", "mybucket", "pre", "auto", False)),
        # Exoscale
        ("https://sos-ch-gva-2.exo.io/mybucket",
         S3Location("https://sos-ch-gva-2.exo.io", "mybucket", "", "ch-gva-2", True)),
        ("https://mybucket.sos-ch-gva-2.exo.io/p",
         S3Location("https://sos-ch-gva-2.exo.io", "mybucket", "p", "ch-gva-2", False)),
        # Scaleway
        ("https://s3.fr-par.scw.cloud/mybucket",
         S3Location("https://s3.fr-par.scw.cloud", "mybucket", "", "fr-par", True)),
        ("https://s3.fr-par.scw.cloud/mybucket/a/b",
         S3Location("https://s3.fr-par.scw.cloud", "mybucket", "a/b", "fr-par", True)),
        ("https://mybucket.s3.nl-ams.scw.cloud",
         S3Location("https://s3.nl-ams.scw.cloud", "mybucket", "", "nl-ams", False)),
        # any endpoint, with a port (MinIO, SeaweedFS, Garage...)
        ("http://127.0.0.1:8333/bucket/prefix",
         S3Location("http://127.0.0.1:8333", "bucket", "prefix", None, True)),
        ("http://localhost:9000/bucket",
         S3Location("http://localhost:9000", "bucket", "", None, True)),
        ("https://minio.example.org/bucket/a/b/c",
         S3Location("https://minio.example.org", "bucket", "a/b/c", None, True)),
        ("http://[::1]:8333/bucket/p",
         S3Location("http://[::1]:8333", "bucket", "p", None, True)),
        ("https://mybucket.s3.eu-west-1.amazonaws.com:8443/p",
         S3Location("https://s3.eu-west-1.amazonaws.com:8443", "mybucket", "p", "eu-west-1", False)),
        # slashes are not part of names; percent-escapes are decoded
        ("https://s3.eu-west-3.amazonaws.com//mybucket//pre//",
         S3Location("https://s3.eu-west-3.amazonaws.com", "mybucket", "pre", "eu-west-3", True)),
        ("https://mybucket.s3.eu-west-3.amazonaws.com/a%20b/c",
         S3Location("https://s3.eu-west-3.amazonaws.com", "mybucket", "a b/c", "eu-west-3", False)),
        # host names are case-insensitive; prefixes are not
        ("HTTPS://MyBucket.S3.EU-WEST-3.amazonaws.com/Pre",
         S3Location("https://s3.eu-west-3.amazonaws.com", "mybucket", "Pre", "eu-west-3", False)),
        # s3: prefix, with and without //, https by default
        ("s3:mybucket.s3.eu-west-3.amazonaws.com/pre",
         S3Location("https://s3.eu-west-3.amazonaws.com", "mybucket", "pre", "eu-west-3", False)),
        ("s3://mybucket.s3.eu-west-3.amazonaws.com/pre",
         S3Location("https://s3.eu-west-3.amazonaws.com", "mybucket", "pre", "eu-west-3", False)),
        ("s3:s3.eu-west-3.amazonaws.com/mybucket",
         S3Location("https://s3.eu-west-3.amazonaws.com", "mybucket", "", "eu-west-3", True)),
        ("S3://s3.fr-par.scw.cloud/mybucket/p",
         S3Location("https://s3.fr-par.scw.cloud", "mybucket", "p", "fr-par", True)),
        ("s3://127.0.0.1:8333/bucket",
         S3Location("https://127.0.0.1:8333", "bucket", "", None, True)),
        ("s3:http://127.0.0.1:8333/bucket/prefix",
         S3Location("http://127.0.0.1:8333", "bucket", "prefix", None, True)),
        ("s3://http://127.0.0.1:8333/bucket",
         S3Location("http://127.0.0.1:8333", "bucket", "", None, True)),
    ],
)
def test_s3_urls(url: str, expected: S3Location) -> None:
    assert parse_url(url) == expected


# --- SFTP --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url, expected",
    [
        ("user@host:/srv/backup", SFTPLocation("user", "host", None, "/srv/backup")),
        ("user@host:backup", SFTPLocation("user", "host", None, "backup")),
        ("host.example.org:/srv/backup", SFTPLocation(None, "host.example.org", None, "/srv/backup")),
        ("user@192.168.1.2:/srv", SFTPLocation("user", "192.168.1.2", None, "/srv")),
        ("user@[::1]:/srv", SFTPLocation("user", "::1", None, "/srv")),
        ("user@host:/path with:colon", SFTPLocation("user", "host", None, "/path with:colon")),
        ("ssh://user@host/srv/backup", SFTPLocation("user", "host", None, "/srv/backup")),
        ("ssh://user@host:2222/srv/backup", SFTPLocation("user", "host", 2222, "/srv/backup")),
        ("ssh://host/srv", SFTPLocation(None, "host", None, "/srv")),
        ("ssh://user@host/~/backup", SFTPLocation("user", "host", None, "backup")),
        ("ssh://us%40er@host/p", SFTPLocation("us@er", "host", None, "/p")),
        ("ssh://user@[::1]:2222/p", SFTPLocation("user", "::1", 2222, "/p")),
        ("sftp://user@host/srv/backup", SFTPLocation("user", "host", None, "/srv/backup")),
        ("sftp://user@host:2222/srv/backup", SFTPLocation("user", "host", 2222, "/srv/backup")),
        ("SFTP://host", SFTPLocation(None, "host", None, "/")),
        ("sftp://host/with%20space", SFTPLocation(None, "host", None, "/with space")),
    ],
)
def test_sftp_urls(url: str, expected: SFTPLocation) -> None:
    assert parse_url(url) == expected


# --- malformed ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "",
        "   ",
        # bad scheme
        "ftp://host/x",
        "gs://bucket/x",
        "s3:ftp://host/bucket",
        "file:",
        "file://otherhost/srv/backup",
        # no bucket or no host
        "https://s3.eu-west-3.amazonaws.com",
        "https://s3.eu-west-3.amazonaws.com/",
        "http://127.0.0.1:8333",
        "http://127.0.0.1:8333/",
        "https://",
        "s3:",
        "s3://",
        "https://s3.amazonaws.com/Bad_bucket!/x",
        # bad port
        "http://127.0.0.1:99999/bucket",
        "http://127.0.0.1:abc/bucket",
        "http://127.0.0.1:0/bucket",
        "http://127.0.0.1:-1/bucket",
        "ssh://user@host:99999/x",
        "ssh://user@host:abc/x",
        "sftp://user@host:0/x",
        # credentials in the URL
        "https://AKIAKEY:s3cr3tvalue@s3.eu-west-3.amazonaws.com/bucket",
        "https://AKIAKEY@s3.eu-west-3.amazonaws.com/bucket",
        "https://AKIAKEY:s3cr3tvalue@mybucket.s3.eu-west-3.amazonaws.com/p",
        "s3://AKIAKEY:s3cr3tvalue@127.0.0.1:8333/bucket",
        "ssh://user:pa55word@host/path",
        "sftp://user:pa55word@host/path",
        # other garbage
        "https://mybucket.s3.amazonaws.com/p?versionId=3",
        "https://s3.eu-west-3.amazonaws.com/mybucket#frag",
        "ssh:///path",
        "sftp://host/path?x=1",
        "user@host:",
        "host:",
    ],
)
def test_malformed_urls(url: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_url(url)
    message = info.value.message
    assert "\n" not in message
    # never echo a secret back, even inside the URL
    assert "s3cr3tvalue" not in message and "pa55word" not in message
    if url.strip() and "s3cr3tvalue" not in url and "pa55word" not in url:
        assert url.strip() in message  # says which URL is wrong


def test_credentials_error_says_where_they_belong() -> None:
    with pytest.raises(ConfigError, match=r"\[S3\]"):
        parse_url("https://AKIAKEY:s3cr3tvalue@s3.eu-west-3.amazonaws.com/bucket")
    with pytest.raises(ConfigError, match=r"\[SFTP\]"):
        parse_url("ssh://user:pa55word@host/path")


# --- load_config ------------------------------------------------------------------


@pytest.fixture(autouse=True)
def no_default_config(monkeypatch: pytest.MonkeyPatch) -> None:
    """Never pick up a config file from the machine running the tests."""
    monkeypatch.setattr(configmod, "DEFAULT_CONFIG_PATHS", ())


def write_ini(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_full_config_file(tmp_path: Path) -> None:
    ini = write_ini(tmp_path / "rekkord.ini", f"""
# comment
[Repository]
URL = https://mybucket.s3.eu-west-3.amazonaws.com/laptop
KeyFile = keys/write.key

[S3]
KeyID = AKIAFILE
SecretKey = file-secret
Region = eu-west-3

[SFTP]
Password = hunter2
KeyFile = ssh/id_ed25519
Fingerprint = {FINGERPRINT}
Port = 2222
""")
    config = load_config(config_file=ini, env={})
    assert config.location == S3Location("https://s3.eu-west-3.amazonaws.com", "mybucket", "laptop", "eu-west-3", False)
    assert config.url == "https://mybucket.s3.eu-west-3.amazonaws.com/laptop"
    assert config.key_file == str(tmp_path / "keys" / "write.key")  # relative to the config file
    assert (config.s3.key_id, config.s3.secret_key, config.s3.region) == ("AKIAFILE", "file-secret", "eu-west-3")
    assert config.sftp.password == "hunter2"
    assert config.sftp.key_file == str(tmp_path / "ssh" / "id_ed25519")
    assert config.sftp.fingerprint == FINGERPRINT
    assert config.sftp.port == 2222
    assert config.config_file == ini


def test_access_key_id_and_its_alias(tmp_path: Path) -> None:
    """[S3] AccessKeyID as Rekkord's documentation writes it; KeyID as well."""
    for name in ("AccessKeyID", "KeyID", "accesskeyid"):
        ini = write_ini(tmp_path / f"{name}.ini", f"[S3]\n{name} = AKIAFILE\n")
        config = load_config(config_file=ini, env={"AWS_ACCESS_KEY_ID": "AKIAENV"})
        assert config.s3.key_id == "AKIAFILE", name
    empty = write_ini(tmp_path / "empty.ini", "[S3]\nAccessKeyID =\n")
    assert load_config(config_file=empty, env={"AWS_ACCESS_KEY_ID": "AKIAENV"}).s3.key_id == "AKIAENV"


def test_setting_names_are_case_insensitive(tmp_path: Path) -> None:
    ini = write_ini(tmp_path / "r.ini", "[Repository]\nurl = /srv/repo\nkeyfile = /k/master.key\n")
    config = load_config(config_file=ini, env={})
    assert config.location == LocalLocation("/srv/repo")
    assert config.key_file == "/k/master.key"


def test_local_url_and_keyfile_relative_to_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "etc"
    folder.mkdir()
    ini = write_ini(folder / "rekkord.ini", "[Repository]\nURL = repo\nKeyFile = master.key\n")
    monkeypatch.chdir(tmp_path)
    config = load_config(config_file="etc/rekkord.ini", env={})
    assert Path(config.location.path).resolve() == (folder / "repo").resolve()  # type: ignore[union-attr]
    assert Path(config.key_file).resolve() == (folder / "master.key").resolve()  # type: ignore[arg-type]
    # absolute and ~ paths are kept as they are
    write_ini(folder / "rekkord.ini", "[Repository]\nURL = /srv/repo\nKeyFile = ~/master.key\n")
    config = load_config(config_file=ini, env={"HOME": "/home/someone"})
    assert config.location == LocalLocation("/srv/repo")
    assert config.key_file == str(Path("~/master.key").expanduser())


def test_command_line_paths_are_not_rebased(tmp_path: Path) -> None:
    ini = write_ini(tmp_path / "r.ini", "[Repository]\nURL = fromfile\nKeyFile = fromfile.key\n")
    config = load_config(config_file=ini, repository="rel/repo", key_file="rel.key", env={})
    assert config.location == LocalLocation("rel/repo")
    assert config.key_file == "rel.key"


def test_precedence_command_line_env_file(tmp_path: Path) -> None:
    ini = write_ini(tmp_path / "r.ini", "[Repository]\nURL = /from/file\nKeyFile = /from/file.key\n")
    env = {"REKKORD_REPOSITORY": "/from/env", "REKKORD_KEYFILE": "/from/env.key"}
    config = load_config(config_file=ini, env={})
    assert (config.location, config.key_file) == (LocalLocation("/from/file"), "/from/file.key")
    config = load_config(config_file=ini, env=env)
    assert (config.location, config.key_file) == (LocalLocation("/from/env"), "/from/env.key")
    config = load_config(config_file=ini, repository="/from/cli", key_file="/from/cli.key", env=env)
    assert (config.location, config.key_file) == (LocalLocation("/from/cli"), "/from/cli.key")
    # one from each level
    config = load_config(config_file=ini, repository="/from/cli", env={"REKKORD_KEYFILE": "/from/env.key"})
    assert (config.location, config.key_file) == (LocalLocation("/from/cli"), "/from/env.key")
    config = load_config(config_file=ini, key_file="/from/cli.key", env={"REKKORD_REPOSITORY": "/from/env"})
    assert (config.location, config.key_file) == (LocalLocation("/from/env"), "/from/cli.key")


def test_empty_env_values_do_not_count(tmp_path: Path) -> None:
    ini = write_ini(tmp_path / "r.ini", "[Repository]\nURL = /from/file\nKeyFile = /from/file.key\n")
    config = load_config(config_file=ini, env={"REKKORD_REPOSITORY": "", "REKKORD_KEYFILE": ""})
    assert (config.location, config.key_file) == (LocalLocation("/from/file"), "/from/file.key")


def test_config_file_from_env_and_command_line(tmp_path: Path) -> None:
    a = write_ini(tmp_path / "a.ini", "[Repository]\nURL = /repo/a\n")
    b = write_ini(tmp_path / "b.ini", "[Repository]\nURL = /repo/b\n")
    assert load_config(env={"REKKORD_CONFIG_FILE": a}).location == LocalLocation("/repo/a")
    assert load_config(config_file=b, env={"REKKORD_CONFIG_FILE": a}).location == LocalLocation("/repo/b")


def test_default_config_paths_are_searched(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = tmp_path / "nothing.ini"
    found = write_ini(tmp_path / "found.ini", "[Repository]\nURL = /repo/default\n")
    monkeypatch.setattr(configmod, "DEFAULT_CONFIG_PATHS", (missing, Path(found)))
    config = load_config(env={})
    assert config.location == LocalLocation("/repo/default")
    assert config.config_file == found


def test_no_config_at_all() -> None:
    config = load_config(env={})
    assert config.location is None and config.key_file is None and config.config_file is None
    with pytest.raises(ConfigError, match="-R"):
        config.require_location()
    with pytest.raises(ConfigError, match="-K"):
        config.require_key_file()


def test_ambient_credentials_only_fill_gaps(tmp_path: Path) -> None:
    env = {
        "AWS_ACCESS_KEY_ID": "AKIAENV", "AWS_SECRET_ACCESS_KEY": "env-secret", "AWS_REGION": "us-west-2",
        "SSH_PASSWORD": "env-password", "SSH_KEYFILE": "/env/id", "SSH_FINGERPRINT": "SHA256:" + "B" * 43,
    }
    full = write_ini(tmp_path / "full.ini", f"""[S3]
KeyID = AKIAFILE
SecretKey = file-secret
Region = eu-west-3
[SFTP]
Password = file-password
KeyFile = /file/id
Fingerprint = {FINGERPRINT}
""")
    config = load_config(config_file=full, env=env)
    assert (config.s3.key_id, config.s3.secret_key, config.s3.region) == ("AKIAFILE", "file-secret", "eu-west-3")
    assert (config.sftp.password, config.sftp.key_file, config.sftp.fingerprint) == (
        "file-password", "/file/id", FINGERPRINT)

    empty = write_ini(tmp_path / "empty.ini", "[S3]\nKeyID =\n[SFTP]\n")
    config = load_config(config_file=empty, env=env)
    assert (config.s3.key_id, config.s3.secret_key, config.s3.region) == ("AKIAENV", "env-secret", "us-west-2")
    assert (config.sftp.password, config.sftp.key_file, config.sftp.fingerprint) == (
        "env-password", "/env/id", "SHA256:" + "B" * 43)

    # S3_* is the fallback after AWS_*
    s3_env = {"S3_ACCESS_KEY_ID": "S3ID", "S3_SECRET_ACCESS_KEY": "s3-secret", "S3_REGION": "fr-par"}
    config = load_config(env=s3_env)
    assert (config.s3.key_id, config.s3.secret_key, config.s3.region) == ("S3ID", "s3-secret", "fr-par")
    config = load_config(env={**s3_env, "AWS_ACCESS_KEY_ID": "AKIAENV"})
    assert config.s3.key_id == "AKIAENV"


def test_ambient_variables_never_set_the_repository() -> None:
    config = load_config(env={"AWS_ACCESS_KEY_ID": "x", "SSH_PASSWORD": "y"})
    assert config.location is None


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("[Repository]\nURL = /x\n[Backup]\nPath = /y\n", "unknown section [Backup]"),
        ("[Repository]\nURL = /x\nPassword = y\n", "unknown setting 'Password' in [Repository]"),
        ("[S3]\nAccessKey = y\n", "unknown setting 'AccessKey' in [S3]"),
        ("[SFTP]\nUser = y\n", "unknown setting 'User' in [SFTP]"),
        ("URL = /x\n", "malformed"),
        ("[Repository\nURL = /x\n", "malformed"),
        ("[Repository]\nURL = /x\nURL = /y\n", "malformed"),
        ("[Repository]\nURL = /x\n[Repository]\n", "malformed"),
        ("[Repository]\nURL = /x\nurl = /y\n", "URL"),
        ("[Repository]\njust some words\n", "malformed"),
        ("[Repository]\nURL = ftp://host/x\n", "unsupported scheme"),
        ("[SFTP]\nPort = twenty-two\n", "port"),
        ("[SFTP]\nPort = 0\n", "port"),
        ("[SFTP]\nPort = 65536\n", "port"),
        ("[SFTP]\nPort = -22\n", "port"),
        ("[SFTP]\nFingerprint = 12:34:56:78\n", "fingerprint"),
        ("[SFTP]\nFingerprint = SHA256:tooshort\n", "fingerprint"),
        ("[SFTP]\nFingerprint = MD5:" + "A" * 43 + "\n", "fingerprint"),
        ("[S3]\nAccessKeyID = a\nKeyID = b\n", "setting 'AccessKeyID' appears twice in [S3] (as 'KeyID')"),
        ("[S3]\nkeyid = a\nACCESSKEYID = b\n", "appears twice"),
    ],
)
def test_bad_config_files(tmp_path: Path, text: str, fragment: str) -> None:
    ini = write_ini(tmp_path / "bad.ini", text)
    with pytest.raises(ConfigError) as info:
        load_config(config_file=ini, env={})
    assert fragment.lower() in info.value.message.lower()
    assert "\n" not in info.value.message


def test_bad_fingerprint_from_environment() -> None:
    with pytest.raises(ConfigError, match="fingerprint"):
        load_config(env={"SSH_FINGERPRINT": "SHA1:abc"})


def test_unreadable_config_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(config_file=str(tmp_path / "missing.ini"), env={})
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(env={"REKKORD_CONFIG_FILE": str(tmp_path / "missing.ini")})
    with pytest.raises(ConfigError, match="folder.ini"):
        (tmp_path / "folder.ini").mkdir()
        load_config(config_file=str(tmp_path / "folder.ini"), env={})
    binary = tmp_path / "binary.ini"
    binary.write_bytes(b"\x00\xff\xfe\x80garbage\n")
    with pytest.raises(ConfigError, match="binary.ini") as info:
        load_config(config_file=str(binary), env={})
    assert "\n" not in info.value.message


def test_thread_count() -> None:
    assert load_config(threads=3, env={}).threads == 3
    assert load_config(env={}).threads >= 1
    with pytest.raises(ConfigError):
        load_config(threads=0, env={})
