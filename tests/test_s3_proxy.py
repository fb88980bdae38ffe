"""S3 repositories through an HTTP proxy (http_proxy, https_proxy, no_proxy), on
SeaweedFS behind tests/httpproxy.py: full URLs for http endpoints, CONNECT
tunnels for https ones, Basic credentials, bypass, and a dead proxy."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from rekkordfs.errors import ConfigError
from rekkordfs.storage.proxyenv import bypasses, parse_proxy_url, proxy_for
from tests.httpproxy import HttpProxy, TlsFront
from tests.servers import BUCKET, SeaweedFS, free_ports
from tests.test_backends_cli import assert_same_tree, make_tree, one_line_error, runner_for

NO_PROXY_VARIABLES = {name: "" for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY",
                                            "no_proxy", "NO_PROXY")}


@pytest.fixture
def proxy() -> Iterator[HttpProxy]:
    server = HttpProxy()
    yield server
    server.close()


def _runner(tmp_path: Path, url: str, server: SeaweedFS, env: dict[str, str], name: str = "cfg"):
    runner = runner_for(tmp_path, url, server.config_sections(), name=name)
    runner.env.update(NO_PROXY_VARIABLES)
    runner.env.update(env)
    return runner


def _save_and_restore(runner, tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src")
    runner("init", "-K", str(tmp_path / "master.key"))
    runner.key_file = str(tmp_path / "master.key")
    runner.save("laptop", str(src))
    runner("restore", f"laptop:{src}", str(tmp_path / "out"))
    assert_same_tree(src, tmp_path / "out")


def test_http_endpoint_through_the_proxy(seaweedfs_server: SeaweedFS, proxy: HttpProxy, tmp_path: Path) -> None:
    prefix = f"proxied-{secrets.token_hex(4)}"
    runner = _runner(tmp_path, seaweedfs_server.url(BUCKET, prefix), seaweedfs_server, {"http_proxy": proxy.url})
    _save_and_restore(runner, tmp_path)
    # every request went through it, as full URLs naming the endpoint
    base = f"{seaweedfs_server.endpoint}/{BUCKET}/{prefix}/"
    puts, gets = proxy.seen("PUT"), proxy.seen("GET")
    assert puts and all(target.startswith(base) for target in puts)
    assert any(target.startswith(base) for target in gets)
    assert not proxy.seen("CONNECT")


def test_https_endpoint_through_a_tunnel_with_credentials(seaweedfs_server: SeaweedFS, tmp_path: Path) -> None:
    front = TlsFront(seaweedfs_server.s3_port, tmp_path)
    proxy = HttpProxy(credentials=("backup user", "p@ss:word"))
    try:
        url = f"{front.endpoint}/{BUCKET}/tunnelled-{secrets.token_hex(4)}"
        env = {"https_proxy": f"http://backup%20user:p%40ss%3Aword@127.0.0.1:{proxy.port}",
               "AWS_CA_BUNDLE": str(front.certificate)}
        runner = _runner(tmp_path, url, seaweedfs_server, env)
        _save_and_restore(runner, tmp_path)
        tunnels = proxy.seen("CONNECT")
        assert tunnels and set(tunnels) == {f"127.0.0.1:{front.port}"}
        assert proxy.refused == 0
        assert not proxy.seen("PUT")  # inside the tunnel, unseen

        wrong = {**env, "https_proxy": f"http://backup%20user:nope@127.0.0.1:{proxy.port}"}
        refused = _runner(tmp_path, url, seaweedfs_server, wrong, name="wrong")
        error = one_line_error(refused("snapshots", key=str(tmp_path / "master.key"), check=False))
        assert f"cannot connect to proxy http://backup%20user@127.0.0.1:{proxy.port}" in error, error
        assert "407" in error and "nope" not in error
        assert proxy.refused >= 1

        # without the certificate, the endpoint's TLS fails in one line
        untrusted = _runner(tmp_path, url, seaweedfs_server, {"https_proxy": env["https_proxy"]}, name="untrusted")
        listed = untrusted("snapshots", key=str(tmp_path / "master.key"), check=False)
        assert "TLS error with S3 endpoint" in one_line_error(listed)
    finally:
        proxy.close()
        front.close()


def test_no_proxy_goes_direct(seaweedfs_server: SeaweedFS, proxy: HttpProxy, tmp_path: Path) -> None:
    url = seaweedfs_server.url(BUCKET, f"direct-{secrets.token_hex(4)}")
    runner = _runner(tmp_path, url, seaweedfs_server, {"HTTP_PROXY": proxy.url, "NO_PROXY": "localhost,127.0.0.1"})
    _save_and_restore(runner, tmp_path)
    assert proxy.requests == []


def test_dead_proxy_is_one_line(seaweedfs_server: SeaweedFS, tmp_path: Path) -> None:
    port = free_ports(1)[0]
    runner = _runner(tmp_path, seaweedfs_server.url(BUCKET, "dead"), seaweedfs_server,
                     {"http_proxy": f"http://someone:hunter2@127.0.0.1:{port}"})
    result = runner("init", "-K", str(tmp_path / "k"), check=False)
    error = one_line_error(result)
    assert (f"cannot connect to proxy http://someone@127.0.0.1:{port} for S3 endpoint "
            f"{seaweedfs_server.endpoint}: Connection refused") in error, error
    assert "hunter2" not in result.stdout + result.stderr
    bad = _runner(tmp_path, seaweedfs_server.url(BUCKET, "dead"), seaweedfs_server,
                  {"http_proxy": "socks5://127.0.0.1:1080"}, name="socks")
    refused = bad("init", "-K", str(tmp_path / "k2"), check=False)
    assert "http_proxy: proxy 'socks5://127.0.0.1:1080' is not supported" in one_line_error(refused)


@pytest.mark.parametrize(("no_proxy", "host", "port", "bypassed"), [
    ("*", "s3.example.com", 443, True),
    ("example.com", "s3.example.com", 443, True),
    (".example.com", "s3.example.com", 443, True),
    ("example.com", "example.com", 443, True),
    ("example.com", "notexample.com", 443, False),
    ("other.org, s3.example.com:9000", "s3.example.com", 9000, True),
    ("s3.example.com:9000", "s3.example.com", 443, False),
    ("10.0.0.0/8", "10.1.2.3", 80, True),
    ("10.0.0.0/8", "11.1.2.3", 80, False),
    ("127.0.0.1", "127.0.0.1", 8333, True),
    ("::1", "::1", 80, True),
    ("[::1]:80", "::1", 80, True),
    ("", "127.0.0.1", 80, False),
])
def test_no_proxy_matching(no_proxy: str, host: str, port: int, bypassed: bool) -> None:
    assert bypasses(no_proxy, host, port) is bypassed


def test_proxy_variables() -> None:
    env = {"https_proxy": "http://low:3128", "HTTPS_PROXY": "http://up:3128", "HTTP_PROXY": "plain:8080"}
    assert proxy_for("https", "h", 443, env) == parse_proxy_url("http://low:3128", "https_proxy")
    found = proxy_for("http", "h", 80, env)
    assert found is not None and (found.host, found.port, found.authorization) == ("plain", 8080, None)
    assert proxy_for("http", "h", 80, {}) is None
    with_user = parse_proxy_url("http://u:p@host", "http_proxy")
    assert with_user.authorization == "Basic dTpw" and with_user.shown == "http://u@host" and with_user.port == 80
    for bad in ("https://secure:443", "http://host:notaport", "http://"):
        with pytest.raises(ConfigError, match="https_proxy"):
            parse_proxy_url(bad, "https_proxy")


def test_unreadable_ca_bundle_is_one_line(tmp_path: Path) -> None:
    from rekkordfs.storage.s3http import S3Client

    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    for bundle, reason in ((tmp_path / "missing.pem", "No such file"), (junk, "no certificate")):
        with pytest.raises(ConfigError, match=f"AWS_CA_BUNDLE: cannot load certificates from '{bundle}': .*{reason}"):
            S3Client("https://127.0.0.1:9", "bucket", "us-east-1", "id", "secret", path_style=True,
                     environ={"AWS_CA_BUNDLE": str(bundle)})
