"""Writes the client does not check itself (`_preload_content=False`: Secrets, Events) read the API server's answer:
a refused create is an error, not "created" (seen under chaos: an injected 500 on a job's credentials Secret was
logged as issued, and its Pod waited for a Secret that never existed). Both backends."""

from __future__ import annotations

import pytest

from gpujob import kube
from tests.support.kubernetes import ApiTarget


def secret(name: str) -> dict[str, object]:
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name}, "data": {"K": "dg=="}}


async def test_secret_writes_report_what_the_api_server_answered(api: ApiTarget) -> None:
    try:
        assert await kube.create_secret(api.namespace, secret("raw-1")) is kube.Effect.CREATED
        # 409: it exists (the credentials' issue() then replaces it; read as "created", the old one stayed)
        assert await kube.create_secret(api.namespace, secret("raw-1")) is kube.Effect.EXISTED
        # 404 naming the namespace: refused, an error the caller retries
        with pytest.raises(kube.ApiException) as refused:
            await kube.create_secret("no-such-namespace", secret("raw-2"))
        assert refused.value.status == 404
        assert kube.message_of(refused.value)  # the API server's message, read from the raw answer
        assert await kube.delete_secret(api.namespace, "raw-1") is kube.Effect.DELETED
        assert await kube.delete_secret(api.namespace, "raw-1") is kube.Effect.ABSENT
    finally:
        await kube.close()
