"""gpujob-operator: run GPU jobs as Kubernetes custom resources, fed by Redis Streams."""

__version__ = "0.1.0"
