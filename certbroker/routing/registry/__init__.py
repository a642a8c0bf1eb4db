"""The department registry: adapter instances register, heartbeat and deregister themselves.

- :mod:`~certbroker.routing.registry.servicer`: the ``certbroker.v1.Registry`` service
  (department credentials; every change audited);
- :mod:`~certbroker.routing.registry.store`: the live instances and their leases;
- :mod:`~certbroker.routing.registry.endpoints`: where a department may register (the catalogue's
  ``endpoints``; the broker's own ports never);
- :mod:`~certbroker.routing.registry.validation`: request field checks.
"""

from certbroker.routing.registry.endpoints import EndpointGuard as EndpointGuard
from certbroker.routing.registry.servicer import RegistryService as RegistryService
from certbroker.routing.registry.store import Instance as Instance
from certbroker.routing.registry.store import RegistryStore as RegistryStore

__all__ = ["EndpointGuard", "Instance", "RegistryService", "RegistryStore"]
