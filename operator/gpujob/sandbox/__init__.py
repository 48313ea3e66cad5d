"""The local control plane for development and tests: a Kubernetes API emulator (built on kmock).

`Emulator` runs on the caller's event loop (`async with`); `EmulatorThread` runs it on its own thread.
"""

from gpujob.sandbox.emulator import Emulator, EmulatorThread, load_manifests
from gpujob.sandbox.faults import Faults, RequestKey
from gpujob.sandbox.kubeconfig import write_kubeconfig

__all__ = ["Emulator", "EmulatorThread", "Faults", "RequestKey", "load_manifests", "write_kubeconfig"]
