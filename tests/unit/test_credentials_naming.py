"""Per-job credential names, rules and URLs (issue 15): pure parts of gpujob.credentials."""

from __future__ import annotations

from urllib.parse import unquote, urlsplit

from gpujob.credentials.common import JobRef
from gpujob.credentials.redis_acl import redis_url_for, rules, username
from gpujob.credentials.s3 import user_name
from gpujob.settings import Settings


def test_job_ref_from_a_body_collects_every_s3_key_of_the_params() -> None:
    body = {
        "metadata": {"namespace": "ns", "name": "n", "uid": "u-1"},
        "spec": {
            "type": "render_video",
            "params": {"audio": {"s3Key": "in/a.wav"}, "clips": [{"s3Key": "in/b.mp4"}, {"s3Key": "in/a.wav"}]},
        },
    }
    job = JobRef.from_body(body)
    assert (job.job_id, job.artifact_prefix, job.input_keys) == ("n", "videos/n/", ("in/a.wav", "in/b.mp4"))
    assert JobRef("ns", "n", "u", "j", "no-such-type").artifact_prefix == "jobs/j/"


def test_rules_grant_exactly_the_jobs_keys_and_channel() -> None:
    job = JobRef("ns", "n", "u-1", "a:b.c")
    out = rules(Settings(), job, "pw")
    assert out[:6] == ["reset", "on", ">pw", "resetkeys", "resetchannels", "-@all"]
    assert [r for r in out if r[0] in "~&"] == [
        "~gpujobs:seq:a:b.c",
        "~gpujobs:state:a:b.c",
        "~gpujobs:events:a:b.c",
        "&gpujobs:progress:a:b.c",
    ]
    assert username(job) == "gpujob-job:ns:n:u-1" and user_name(job) == "gpujob-job-u-1"


def test_the_jobs_redis_url_keeps_the_server_and_replaces_the_user() -> None:
    url = redis_url_for("rediss://gpujob:secret@redis.example:6380/0?ssl_ca_certs=/ca.pem", "gpujob-job:a:b:c", "p/w@")
    parts = urlsplit(url)
    assert (parts.scheme, parts.hostname, parts.port, parts.path, parts.query) == (
        "rediss",
        "redis.example",
        6380,
        "/0",
        "ssl_ca_certs=/ca.pem",
    )
    assert (unquote(parts.username or ""), unquote(parts.password or "")) == ("gpujob-job:a:b:c", "p/w@")
    assert "secret" not in url
    assert redis_url_for("redis://[::1]:6379/0", "u", "p") == "redis://u:p@[::1]:6379/0"
