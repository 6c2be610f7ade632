"""Network-namespace testbed: two facilities that cannot reach each other but through SciStream.

``testbed`` builds and removes the namespaces (used by tests/netns and ``scistream demo
--netns``); ``wan`` describes an emulated WAN between the gateways (``Testbed(wan=WanSpec(...))``)
and builds its packet element (``wanem.c``); ``peer`` holds the probes and echo tools run
inside them.

    from scistream.netns import Testbed
    with Testbed() as tb:
        print(tb.describe())
"""
from ..procs import spawn
from .testbed import FacilityTestbed, Host, Testbed, TestbedError, cleanup_leftovers, unavailable_reason
from .wan import WanSpec, WanSpecError

__all__ = ["FacilityTestbed", "Host", "Testbed", "TestbedError", "WanSpec", "WanSpecError", "cleanup_leftovers",
           "spawn", "unavailable_reason"]
