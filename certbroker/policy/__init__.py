"""Declarative access policy: load a policy set, decide lookups, describe what a clerk may do.

The public API of the package, re-exported from its modules (see :mod:`certbroker.policy.model`
for how they are layered; none of them imports this one)::

    policies = load(policy_dir)              # PolicySet, or PolicyError with every problem
    decision = policies.decide(Request(...))  # Decision: allowed, rule, fields, masks, ...
    views = matters_for(policies, clerk)     # what the clerk may handle (ListMatters)
    packs = packages_for(policies, clerk)    # ... and the packages of matters (一件事)
    problems = check([policy_dir])            # "path:line: message" strings, [] when valid
    report = run_tests(policy_dir)            # the policy unit tests (TestReport)
"""

from certbroker.policy.hours import DAYS, Hours
from certbroker.policy.loader import check, load
from certbroker.policy.model import (
    CONSENT_METHODS,
    DEFAULT_DENY,
    MATTER_SCOPE,
    MAX_RECORD_BYTES,
    NO_FIELDS_RELEASED,
    RESERVED_RULE_IDS,
    Decision,
    Department,
    EndpointRule,
    Matter,
    Package,
    PolicyError,
    PolicySet,
    PolicySource,
    RecordLimits,
    RecordType,
    Role,
)
from certbroker.policy.rule import (
    CASE_NUMBER_REQUIRED,
    CONSENT_REQUIRED,
    OFFICE_NOT_ALLOWED,
    OUTSIDE_HOURS,
    Conditions,
    Request,
    Rule,
)
from certbroker.policy.testing import TestReport, run_tests
from certbroker.policy.views import MatterView, PackageView, matters_for, packages_for

__all__ = [
    "CASE_NUMBER_REQUIRED",
    "CONSENT_METHODS",
    "CONSENT_REQUIRED",
    "DAYS",
    "DEFAULT_DENY",
    "MATTER_SCOPE",
    "MAX_RECORD_BYTES",
    "NO_FIELDS_RELEASED",
    "OFFICE_NOT_ALLOWED",
    "OUTSIDE_HOURS",
    "RESERVED_RULE_IDS",
    "Conditions",
    "Decision",
    "Department",
    "EndpointRule",
    "Hours",
    "Matter",
    "MatterView",
    "Package",
    "PackageView",
    "PolicyError",
    "PolicySet",
    "PolicySource",
    "RecordLimits",
    "RecordType",
    "Request",
    "Role",
    "Rule",
    "TestReport",
    "check",
    "load",
    "matters_for",
    "packages_for",
    "run_tests",
]
