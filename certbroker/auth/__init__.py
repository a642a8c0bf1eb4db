"""Who is calling: JWT verification against trusted issuers, and the principals it yields.

- :mod:`~certbroker.auth.authenticator`: the :class:`Authenticator` (RFC 8725 checks, claim
  content and lifetime limits, a verified-token cache that never outlives a token);
- :mod:`~certbroker.auth.issuers`: trusted issuers and their keys (PEM files or a JWKS);
- :mod:`~certbroker.auth.principals`: a window :class:`Clerk` and a department credential;
- :mod:`~certbroker.auth.dev_idp`: the development identity provider of the embedded default;
- :mod:`~certbroker.auth.keyfiles`: the one writer of private-key files (0600, fsynced).

Modules inside this package import the defining modules, never this one.
"""

from certbroker.auth.authenticator import Authenticator as Authenticator
from certbroker.auth.dev_idp import DevIdentityProvider as DevIdentityProvider
from certbroker.auth.issuers import TrustedIssuer as TrustedIssuer
from certbroker.auth.issuers import load_issuer as load_issuer
from certbroker.auth.principals import Clerk as Clerk
from certbroker.auth.principals import DepartmentPrincipal as DepartmentPrincipal

__all__ = [
    "Authenticator",
    "Clerk",
    "DepartmentPrincipal",
    "DevIdentityProvider",
    "TrustedIssuer",
    "load_issuer",
]
