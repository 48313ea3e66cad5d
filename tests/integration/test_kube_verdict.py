"""One classification of the API's answers (issue 19 item 2): `kube.verdict` read against what each backend
really answers (the real kube-apiserver is the reference), so callers handle our verdicts, not status codes."""

from __future__ import annotations

from typing import Any

import pytest

from gpujob import kube
from gpujob.api.constants import API_VERSION, GROUP, KIND, VERSION
from gpujob.kube import ApiException, Verdict
from tests.support.kubernetes import ApiTarget


def gpujob(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {"name": name},
        "spec": {"type": "render_video", **spec},
    }


async def failure(call: Any) -> ApiException:
    with pytest.raises(ApiException) as caught:
        await call
    return caught.value


async def test_the_api_servers_answers_get_their_verdict(api: ApiTarget) -> None:
    from kubernetes_asyncio import client

    custom: Any = client.CustomObjectsApi(await kube.api_client())
    try:
        assert await kube.create_gpujob(api.namespace, gpujob("v-1")) is kube.Effect.CREATED
        # 409: the object exists (create_gpujob reads it as "already done"; a raw create sees the conflict)
        exists = await failure(custom.create_namespaced_custom_object(GROUP, VERSION, api.namespace, "gpujobs",
                                                                      gpujob("v-1")))  # fmt: skip
        assert (exists.status, kube.verdict(exists)) == (409, Verdict.CONFLICT)
        # 404 naming the namespace: the request's fault, not a passing state
        no_ns = await failure(kube.create_gpujob("no-such-namespace", gpujob("v-2")))
        assert (no_ns.status, kube.verdict(no_ns)) == (404, Verdict.NOT_FOUND)
        # 404 naming the object
        missing = await failure(custom.get_namespaced_custom_object(GROUP, VERSION, api.namespace, "gpujobs", "nope"))
        assert (missing.status, kube.verdict(missing)) == (404, Verdict.NOT_FOUND)
        # 404 for a resource the server does not serve (a CRD not installed yet): wait for it
        unserved = await failure(custom.create_namespaced_custom_object(GROUP, VERSION, api.namespace, "nosuchjobs",
                                                                        gpujob("v-3")))  # fmt: skip
        assert (unserved.status, kube.verdict(unserved)) == (404, Verdict.TRANSIENT)
        # 422: the schema refuses it, for good
        invalid = await failure(kube.create_gpujob(api.namespace, gpujob("v-4", gpus=-1)))
        assert (invalid.status, kube.verdict(invalid)) == (422, Verdict.REJECTED)
        assert kube.rejected_for_good(invalid) and not kube.rejected_for_good(unserved)
        assert "gpus" in kube.message_of(invalid)
    finally:
        await kube.close()


def answer(status: int, body: str = "{}") -> ApiException:
    exc = ApiException(status=status, reason="Reason")
    exc.body = body
    return exc


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (answer(500), Verdict.TRANSIENT),
        (answer(503), Verdict.TRANSIENT),
        (answer(429), Verdict.TRANSIENT),
        (answer(408), Verdict.TRANSIENT),
        (answer(401), Verdict.TRANSIENT),
        (answer(409), Verdict.CONFLICT),
        (answer(403, '{"message": "pods \\"x\\" is forbidden: exceeded quota: gpus"}'), Verdict.FORBIDDEN),
        (
            answer(403, '{"message": "pods \\"x\\" is forbidden: violates PodSecurity \\"restricted\\""}'),
            Verdict.REJECTED,
        ),
        (answer(400), Verdict.REJECTED),
        (answer(413), Verdict.REJECTED),
        (answer(404, "not json"), Verdict.TRANSIENT),
        (ConnectionRefusedError(), Verdict.TRANSIENT),
        (TimeoutError(), Verdict.TRANSIENT),
        (KeyError("a bug of ours"), None),
    ],
    ids=lambda v: getattr(v, "status", None) or type(v).__name__ if not isinstance(v, Verdict | None) else str(v),
)
def test_verdicts_of_answers_no_server_gives_on_demand(exc: BaseException, expected: Verdict | None) -> None:
    assert kube.verdict(exc) is expected
