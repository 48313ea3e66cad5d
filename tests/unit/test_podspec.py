"""The sandbox's scheduling check (pure): nodeSelector, required node affinity, taints against tolerations, GPUs.

The rules are Kubernetes' own (kube-scheduler's NodeAffinity and TaintToleration filters); the messages are the
scheduler's, so a Pending Pod reads the same in the sandbox as on a real cluster.
"""

from __future__ import annotations

from typing import Any

import pytest

from gpujob.sandbox.podspec import Fit, fits, matches_node, tolerates, untolerated_taint

GPU_TAINT = {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}
LABELS = {"nvidia.com/gpu.product": "NVIDIA-SANDBOX", "zone": "a", "gpu-count": "8"}
NODE = "sandbox-node"
AFFINITY_REFUSED = "0/1 nodes are available: 1 node(s) didn't match Pod's node affinity/selector."


def pod(gpus: int = 0, **spec: Any) -> dict[str, Any]:
    resources = {"limits": {"nvidia.com/gpu": str(gpus)}} if gpus else {}
    return {"spec": {"containers": [{"name": "worker", "resources": resources}], **spec}}


def required(*terms: dict[str, Any]) -> dict[str, Any]:
    return {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": list(terms)}}}


@pytest.mark.parametrize(
    ("toleration", "taint", "expected"),
    [
        ({"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}, GPU_TAINT, True),
        ({"key": "nvidia.com/gpu", "operator": "Exists"}, GPU_TAINT, True),  # no effect: every effect
        ({"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoExecute"}, GPU_TAINT, False),
        ({"key": "nvidia.com/gpu", "operator": "Equal", "value": "present"}, GPU_TAINT, True),
        ({"key": "nvidia.com/gpu", "value": "present"}, GPU_TAINT, True),  # Equal is the default operator
        ({"key": "nvidia.com/gpu", "operator": "Equal", "value": "a100"}, GPU_TAINT, False),
        ({"key": "nvidia.com/gpu", "operator": "Equal"}, GPU_TAINT, False),  # empty value != "present"
        ({"key": "nvidia.com/gpu", "operator": "Equal"}, {"key": "nvidia.com/gpu", "effect": "NoSchedule"}, True),
        ({"key": "dedicated", "operator": "Exists"}, GPU_TAINT, False),
        ({"operator": "Exists"}, GPU_TAINT, True),  # empty key with Exists: every taint
        ({"operator": "Exists", "effect": "NoExecute"}, GPU_TAINT, False),
    ],
)
def test_toleration_rules(toleration: dict[str, Any], taint: dict[str, Any], expected: bool) -> None:
    assert tolerates(toleration, taint) is expected


def test_untolerated_taint_ignores_prefer_no_schedule_and_finds_the_first_blocking_one() -> None:
    soft = {"key": "spot", "value": "true", "effect": "PreferNoSchedule"}
    evicting = {"key": "node.kubernetes.io/unreachable", "effect": "NoExecute"}
    tolerating_gpu = pod(tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists"}])
    assert untolerated_taint(pod(), [soft]) is None
    assert untolerated_taint(pod(), [soft, GPU_TAINT, evicting]) == GPU_TAINT
    assert untolerated_taint(tolerating_gpu, [soft, GPU_TAINT, evicting]) == evicting
    assert untolerated_taint(tolerating_gpu, []) is None


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ({}, True),
        ({"nodeSelector": {"zone": "a"}}, True),
        ({"nodeSelector": {"zone": "b"}}, False),
        ({"nodeSelector": {"pool": "a"}}, False),
        ({"affinity": required({"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a", "b"]}]})}, True),
        ({"affinity": required({"matchExpressions": [{"key": "zone", "operator": "In", "values": ["b"]}]})}, False),
        ({"affinity": required({"matchExpressions": [{"key": "zone", "operator": "NotIn", "values": ["b"]}]})}, True),
        ({"affinity": required({"matchExpressions": [{"key": "pool", "operator": "NotIn", "values": ["x"]}]})}, True),
        ({"affinity": required({"matchExpressions": [{"key": "zone", "operator": "Exists"}]})}, True),
        ({"affinity": required({"matchExpressions": [{"key": "pool", "operator": "Exists"}]})}, False),
        ({"affinity": required({"matchExpressions": [{"key": "pool", "operator": "DoesNotExist"}]})}, True),
        ({"affinity": required({"matchExpressions": [{"key": "gpu-count", "operator": "Gt", "values": ["4"]}]})}, True),
        (
            {"affinity": required({"matchExpressions": [{"key": "gpu-count", "operator": "Lt", "values": ["4"]}]})},
            False,
        ),
        ({"affinity": required({"matchExpressions": [{"key": "zone", "operator": "Gt", "values": ["4"]}]})}, False),
        ({"affinity": required({"matchFields": [{"key": "metadata.name", "operator": "In", "values": [NODE]}]})}, True),
        ({"affinity": required({"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["x"]}]})}, False),
        # Expressions of one term are ANDed; terms are ORed; an empty term matches nothing.
        (
            {
                "affinity": required(
                    {
                        "matchExpressions": [
                            {"key": "zone", "operator": "In", "values": ["a"]},
                            {"key": "pool", "operator": "Exists"},
                        ]
                    }
                )
            },
            False,
        ),
        (
            {
                "affinity": required(
                    {"matchExpressions": [{"key": "pool", "operator": "Exists"}]},
                    {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]},
                )
            },
            True,
        ),
        ({"affinity": required({})}, False),
        ({"affinity": required()}, False),
        # Both nodeSelector and the required affinity must hold.
        (
            {
                "nodeSelector": {"zone": "b"},
                "affinity": required({"matchExpressions": [{"key": "zone", "operator": "Exists"}]}),
            },
            False,
        ),
        # Preferred affinity never keeps a Pod off a node.
        (
            {
                "affinity": {
                    "nodeAffinity": {
                        "preferredDuringSchedulingIgnoredDuringExecution": [
                            {"weight": 1, "preference": {"matchExpressions": [{"key": "pool", "operator": "Exists"}]}}
                        ]
                    }
                }
            },
            True,
        ),
    ],
)
def test_node_selector_and_required_node_affinity(spec: dict[str, Any], expected: bool) -> None:
    assert matches_node(pod(**spec), LABELS, NODE) is expected
    assert fits(pod(**spec), LABELS, 0, node_name=NODE) == (Fit(True) if expected else Fit(False, AFFINITY_REFUSED))


def test_a_tainted_node_takes_only_pods_that_tolerate_its_taints() -> None:
    tolerating = pod(1, tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}])
    assert fits(tolerating, LABELS, 1, taints=[GPU_TAINT]) == Fit(True)
    assert fits(pod(1), LABELS, 1, taints=[GPU_TAINT]) == Fit(
        False, "0/1 nodes are available: 1 node(s) had untolerated taint {nvidia.com/gpu: present}."
    )
    no_value = {"key": "dedicated", "effect": "NoExecute"}
    assert fits(tolerating, LABELS, 1, taints=[GPU_TAINT, no_value]) == Fit(
        False, "0/1 nodes are available: 1 node(s) had untolerated taint {dedicated: }."
    )


def test_checks_run_in_the_schedulers_order_and_the_old_call_still_works() -> None:
    """Affinity first, then taints, then resources; `fits(pod, labels, free_gpus)` alone means no taints."""
    wrong_zone = pod(4, nodeSelector={"zone": "b"})
    assert fits(wrong_zone, LABELS, 0, taints=[GPU_TAINT]).message == AFFINITY_REFUSED
    assert "untolerated taint" in fits(pod(4), LABELS, 0, taints=[GPU_TAINT]).message
    assert fits(pod(4), LABELS, 0) == Fit(False, "0/1 nodes are available: 1 Insufficient nvidia.com/gpu.")
    assert fits(pod(4), LABELS, 4) == Fit(True)
