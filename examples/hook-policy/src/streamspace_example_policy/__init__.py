"""StreamSpace example hook plugins: a template policy per user group, and an audit sink.

Two plugins in one package, each its own entry point in the ``streamspace`` group so an
operator can load one without the other (``STREAMSPACE_LOAD_PLUGINS``):

=================  ===========================================  ===========================
entry point        module                                       runs on
=================  ===========================================  ===========================
template-policy    :mod:`streamspace_example_policy.policy`     the agent (vetoes starts)
audit-jsonl        :mod:`streamspace_example_policy.audit`      the control plane
=================  ===========================================  ===========================
"""

from __future__ import annotations

from streamspace_example_policy.audit import AuditSettings
from streamspace_example_policy.policy import Policy, PolicySettings, load_policy

__all__ = ["AuditSettings", "Policy", "PolicySettings", "load_policy"]
