"""storage/sigv4.py against the worked examples of the AWS Signature Version 4
documentation, and the encoding of object keys that are not plain ASCII words."""

from __future__ import annotations

import pytest

from rekkordfs.storage.sigv4 import EMPTY_SHA256, authorization, canonical_query, signing_key, uri_encode


def test_get_vanilla_example() -> None:
    """The test suite's "get-vanilla": GET / on example.amazonaws.com, service
    'service', 2015-08-30 12:36:00 UTC, the documented example key."""
    key = signing_key("wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", "20150830", "us-east-1", "service")
    header = authorization(
        method="GET", path="/", query="",
        headers={"Host": "example.amazonaws.com", "X-Amz-Date": "20150830T123600Z"},
        payload_hash=EMPTY_SHA256, key_id="AKIDEXAMPLE", key=key, timestamp="20150830T123600Z",
        region="us-east-1", service="service",
    )
    assert header == (
        "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, "
        "SignedHeaders=host;x-amz-date, "
        "Signature=5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31"
    )


def test_s3_get_object_with_range_example() -> None:
    """The S3 documentation's example: the first ten bytes of test.txt in examplebucket."""
    key = signing_key("wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "20130524", "us-east-1", "s3")
    assert key.hex() == "dbb893acc010964918f1fd433add87c70e8b0db6be30c1fbeafefa5ec6ba8378"
    headers = {"Host": "examplebucket.s3.amazonaws.com", "Range": "bytes=0-9",
               "x-amz-content-sha256": EMPTY_SHA256, "x-amz-date": "20130524T000000Z"}
    header = authorization(method="GET", path="/test.txt", query="", headers=headers, payload_hash=EMPTY_SHA256,
                           key_id="AKIAIOSFODNN7EXAMPLE", key=key, timestamp="20130524T000000Z",
                           region="us-east-1")
    assert header == (
        "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request, "
        "SignedHeaders=host;range;x-amz-content-sha256;x-amz-date, "
        "Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41"
    )


def test_s3_list_objects_example() -> None:
    """The S3 documentation's GET Bucket example: query parameters sorted and encoded."""
    key = signing_key("wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "20130524", "us-east-1", "s3")
    query = canonical_query([("prefix", "J"), ("max-keys", "2")])
    assert query == "max-keys=2&prefix=J"
    headers = {"Host": "examplebucket.s3.amazonaws.com", "x-amz-content-sha256": EMPTY_SHA256,
               "x-amz-date": "20130524T000000Z"}
    header = authorization(method="GET", path="/", query=query, headers=headers, payload_hash=EMPTY_SHA256,
                           key_id="AKIAIOSFODNN7EXAMPLE", key=key, timestamp="20130524T000000Z",
                           region="us-east-1")
    assert header.endswith("Signature=34b48302e7b5fa45bde8084f4b7868a86f0a534bc59db6670ed5711ef69dc6f7")


def test_signature_covers_every_part() -> None:
    key = signing_key("secret", "20260101", "eu-west-1", "s3")
    base = dict(method="PUT", path="/b/k", query="", headers={"Host": "h", "x-amz-date": "20260101T000000Z"},
                payload_hash=EMPTY_SHA256, key_id="id", key=key, timestamp="20260101T000000Z", region="eu-west-1")
    reference = authorization(**base)  # type: ignore[arg-type]
    for field, other in (("method", "GET"), ("path", "/b/k2"), ("query", "a=b"), ("payload_hash", "0" * 64),
                         ("headers", {"Host": "h2", "x-amz-date": "20260101T000000Z"})):
        assert authorization(**{**base, field: other}) != reference, field  # type: ignore[arg-type]
    # header names are case-insensitive and values' runs of spaces fold to one
    same = authorization(**{**base, "headers": {"HOST": " h ", "X-Amz-Date": "20260101T000000Z"}})  # type: ignore[arg-type]
    assert same == reference


@pytest.mark.parametrize(("key", "encoded"), [
    ("plain-name_1.2~x", "plain-name_1.2~x"),
    ("with space", "with%20space"),
    ("a+b", "a%2Bb"),
    ("tilde~stays", "tilde~stays"),
    ("dir/sub/file", "dir/sub/file"),
    ("été/日本", "%C3%A9t%C3%A9/%E6%97%A5%E6%9C%AC"),
    ("100%=*?#&", "100%25%3D%2A%3F%23%26"),
])
def test_uri_encoding_of_object_keys(key: str, encoded: str) -> None:
    assert uri_encode(key, keep_slash=True) == encoded
    # in a query string the slash is encoded too
    assert uri_encode(key) == encoded.replace("/", "%2F")


def test_canonical_query_sorts_encoded_names() -> None:
    query = canonical_query([("prefix", "a b/c"), ("list-type", "2"), ("continuation-token", "x+y=")])
    assert query == "continuation-token=x%2By%3D&list-type=2&prefix=a%20b%2Fc"


def test_odd_keys_round_trip_on_a_real_server(seaweedfs_server) -> None:
    """SeaweedFS checks every signature: keys that need encoding are written,
    listed, read, measured and deleted under their own names."""
    import secrets

    import trio

    from rekkordfs.config import S3Settings, parse_url
    from rekkordfs.storage.s3 import S3Storage
    from tests.servers import BUCKET

    keys = ["with space", "plus+sign", "tilde~x", "dir/sub/été 日本", "odd=&?#%*"]
    location = parse_url(seaweedfs_server.url(BUCKET, f"odd-keys-{secrets.token_hex(4)}"))
    storage = S3Storage(location, S3Settings(seaweedfs_server.access_key, seaweedfs_server.secret_key))  # type: ignore[arg-type]

    async def run() -> None:
        await storage.create()
        await storage.connect()
        for number, key in enumerate(keys):
            assert await storage.put(key, f"object {number}".encode())
        listed = await storage.list_details("")
        assert set(keys) <= set(listed)
        for number, key in enumerate(keys):
            assert await storage.get(key) == f"object {number}".encode()
            assert await storage.get_range(key, 7, 100) == str(number).encode()
            assert await storage.object_size(key) == len(f"object {number}")
            await storage.delete(key)
            assert not await storage.exists(key)
        await storage.aclose()

    trio.run(run)
