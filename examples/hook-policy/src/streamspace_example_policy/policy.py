"""The ``template-policy`` hook plugin: which user groups may start which templates.

StreamSpace users have a role (``admin`` or ``user``) but no groups, so the groups come
from a YAML file named by ``TEMPLATE_POLICY_FILE``::

    groups:                      # who is in which group
      engineering: [alice, bob]
      contractors: [carol]
    templates:                   # which groups may start which template; "*" is everyone
      desktop: ["*"]
      gpu-workstation: [engineering]
    default: deny                # templates not listed: "deny" (the default) or "allow"

Why ``prepare_session_spec``: it is the hook that sees both the user and the template of a
session, and may refuse it (``SessionVetoed``) before the platform starts anything. It runs
on the agent, so the file lives on the agent's host; a refused session ends ``failed``
with the veto's message as its reason, which its owner sees.

The file is read at every start (a few hundred bytes; starts are rare), so an edit applies
to the next session without a restart. A policy that cannot be read refuses every session:
a broken policy must never let everyone in.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from streamspace_sdk import SessionSpec, SessionVetoed, hookimpl
from streamspace_sdk.settings import StreamSpaceSettings, load_settings

__all__ = ["EVERYONE", "Policy", "PolicySettings", "load_policy", "prepare_session_spec"]

logger = logging.getLogger("streamspace.example.policy")

EVERYONE = "*"
"""The group every user is in."""


class PolicySettings(StreamSpaceSettings):
    """Where the policy is; read from the environment."""

    template_policy_file: Path | None = None
    """``TEMPLATE_POLICY_FILE``: the YAML policy. Unset refuses every session, because a
    policy plugin that is installed but not configured must not allow everything."""


class Policy(BaseModel):
    """The policy file's content; unknown keys are refused, so a typo cannot open a door."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    groups: dict[str, list[str]] = Field(default_factory=dict)
    """Group name to the usernames in it."""
    templates: dict[str, list[str]] = Field(default_factory=dict)
    """Template name to the groups that may start it (``*``: every user)."""
    default: Literal["allow", "deny"] = "deny"
    """What happens to templates that ``templates`` does not list."""

    def groups_of(self, user: str) -> list[str]:
        """Return the groups ``user`` is in, sorted, ``*`` first."""
        return [EVERYONE, *sorted(g for g, members in self.groups.items() if user in members)]

    def refusal(self, user: str, template: str) -> str | None:
        """Return why ``user`` may not start ``template``, or ``None`` if they may."""
        allowed = self.templates.get(template)
        if allowed is None:
            if self.default == "allow":
                return None
            return f"template {template!r} is not in the template policy, which denies others"
        if set(allowed) & set(self.groups_of(user)):
            return None
        return (
            f"user {user!r} may not start template {template!r}: it is for group(s) "
            f"{', '.join(sorted(allowed)) or '(none)'}, and {user!r} is in none of them"
        )


def load_policy(path: Path) -> Policy:
    """Read and check the policy file.

    Raises:
        ValueError: the file is missing, not YAML, or not a policy; the message says where.
    """
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from None
    try:
        return Policy.model_validate(data if data is not None else {})
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'top level'}: {e['msg']}" for e in exc.errors()
        )
        raise ValueError(f"{path} is not a template policy ({problems})") from None


@hookimpl
def prepare_session_spec(spec: SessionSpec) -> SessionSpec | None:
    """Refuse the session unless the policy lets its user start its template.

    Takes only ``spec`` of the hook's arguments: pluggy passes what an implementation names.
    """
    settings = load_settings(PolicySettings)
    if settings.template_policy_file is None:
        raise SessionVetoed(
            "the template-policy plugin is installed but TEMPLATE_POLICY_FILE is not set; "
            "no session starts until an administrator sets it"
        )
    try:
        policy = load_policy(settings.template_policy_file)
    except ValueError as exc:
        logger.error("Refusing session %s: %s", spec.session_id, exc)
        raise SessionVetoed(
            f"the template policy is broken ({exc}); no session starts until it is fixed"
        ) from None
    reason = policy.refusal(spec.user, spec.template)
    if reason is not None:
        logger.info("Refusing session %s: %s", spec.session_id, reason)
        raise SessionVetoed(reason)
    return None  # allowed, and the spec stays as it is
