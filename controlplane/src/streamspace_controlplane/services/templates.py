"""Templates: what sessions are made from; admins write them, everyone reads them."""

from __future__ import annotations

import logging
from typing import Any

import yaml
from pydantic import ValidationError

from streamspace_controlplane._errors import ApiError, validation_error
from streamspace_controlplane.audit import audit
from streamspace_controlplane.core import ControlPlane
from streamspace_controlplane.models import ACTIVE_STATES, Template, utcnow
from streamspace_controlplane.schemas import TemplateBody, TemplateCreate
from streamspace_controlplane.store.base import Conflict, NotFound
from streamspace_sdk.errors import ConfigError
from streamspace_sdk.hooks import Principal

__all__ = [
    "create_template",
    "delete_template",
    "get_template",
    "list_templates",
    "load_templates_file",
    "update_template",
]

logger = logging.getLogger("streamspace.controlplane")

_PAGE = 500


async def list_templates(cp: ControlPlane) -> list[Template]:
    """Return every template, by name."""
    return await cp.store.list_templates()


async def get_template(cp: ControlPlane, name: str) -> Template:
    """Return one template.

    Raises:
        ApiError: 404 when there is none of that name.
    """
    template = await cp.store.get_template(name)
    if template is None:
        raise ApiError(404, "not_found", f"no template {name!r}")
    return template


def _build(name: str, spec: TemplateBody, **times: Any) -> Template:
    try:
        return Template(name=name, **spec.model_dump(exclude={"name"}), **times)
    except ValidationError as exc:
        raise validation_error(exc, "body") from None


async def create_template(
    cp: ControlPlane, actor: Principal, name: str, spec: TemplateBody
) -> Template:
    """Create a template.

    Raises:
        ApiError: 409 if the name is taken; 422 if a field is invalid.
    """
    now = utcnow()
    try:
        created = await cp.store.create_template(_build(name, spec, created_at=now, updated_at=now))
    except Conflict:
        raise ApiError(409, "conflict", f"template {name!r} already exists") from None
    await audit(cp, actor.username, "template.create", f"template/{name}")
    return created


async def update_template(
    cp: ControlPlane, actor: Principal, name: str, spec: TemplateBody
) -> Template:
    """Replace every field of a template; sessions keep the snapshot they started with.

    Raises:
        ApiError: 404 when there is no such template; 422 if a field is invalid.
    """
    existing = await get_template(cp, name)
    try:
        updated = await cp.store.update_template(
            _build(name, spec, created_at=existing.created_at, updated_at=utcnow())
        )
    except NotFound:
        raise ApiError(404, "not_found", f"no template {name!r}") from None
    await audit(cp, actor.username, "template.update", f"template/{name}")
    return updated


async def _sessions_using(cp: ControlPlane, name: str) -> int:
    count, offset = 0, 0
    while True:
        page, total = await cp.store.list_sessions(
            states=sorted(ACTIVE_STATES), limit=_PAGE, offset=offset
        )
        count += sum(1 for session in page if session.template == name)
        offset += len(page)
        if not page or offset >= total:
            return count


async def delete_template(cp: ControlPlane, actor: Principal, name: str) -> None:
    """Delete a template no active session was started from.

    Raises:
        ApiError: 404 when there is no such template; 409 while a session started from
            it is not stopped.
    """
    await get_template(cp, name)
    in_use = await _sessions_using(cp, name)
    if in_use:
        raise ApiError(
            409,
            "conflict",
            f"template {name!r} is used by {in_use} session(s) that are not stopped",
        )
    if not await cp.store.delete_template(name):
        raise ApiError(404, "not_found", f"no template {name!r}")
    await audit(cp, actor.username, "template.delete", f"template/{name}")


# -- the templates file ------------------------------------------------------------------


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors(include_input=False, include_url=False):
        where = ".".join(str(part) for part in err["loc"]) or "entry"
        parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)


def _parse_templates_file(text: str, source: str) -> list[TemplateCreate]:
    prefix = f"TEMPLATES_FILE: {source}"
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{prefix}: is not valid YAML: {exc}") from None
    if isinstance(data, dict) and "templates" in data:
        if set(data) != {"templates"}:
            extra = ", ".join(sorted(str(key) for key in data if key != "templates"))
            raise ConfigError(f"{prefix}: unexpected top-level keys besides 'templates': {extra}")
        data = data["templates"]
    if data is None:
        return []
    if not isinstance(data, list):
        raise ConfigError(
            f"{prefix}: expected a list of templates or a mapping with a 'templates' list, "
            f"got {type(data).__name__}"
        )
    entries: list[TemplateCreate] = []
    seen: set[str] = set()
    for index, entry in enumerate(data):
        name = entry.get("name") if isinstance(entry, dict) else None
        label = f"templates[{index}]" + (f" ({name!r})" if isinstance(name, str) else "")
        if not isinstance(entry, dict):
            raise ConfigError(f"{prefix}: {label}: expected a mapping, got {type(entry).__name__}")
        try:
            parsed = TemplateCreate.model_validate(entry)
        except ValidationError as exc:
            raise ConfigError(f"{prefix}: {label}: {_describe(exc)}") from None
        if parsed.name in seen:
            raise ConfigError(f"{prefix}: {label}: template {parsed.name!r} appears twice")
        seen.add(parsed.name)
        entries.append(parsed)
    return entries


async def load_templates_file(cp: ControlPlane) -> list[Template]:
    """Create or update the templates listed in ``TEMPLATES_FILE``, if it is set.

    The file is YAML: a list of templates, or a mapping with a ``templates`` list. Every
    entry is checked before any is written, so a bad file changes nothing. Templates not
    in the file are left alone.

    Returns:
        The templates created or changed.

    Raises:
        ConfigError: naming ``TEMPLATES_FILE`` and, for a bad entry, its index and field.
    """
    path = cp.settings.templates_file
    if path is None:
        return []
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"TEMPLATES_FILE: cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"TEMPLATES_FILE: {path} is not UTF-8 text") from None
    changed: list[Template] = []
    for entry in _parse_templates_file(text, str(path)):
        now = utcnow()
        existing = await cp.store.get_template(entry.name)
        if existing is None:
            try:
                template = await cp.store.create_template(
                    _file_template(path, entry, created_at=now, updated_at=now)
                )
            except Conflict:  # another replica loaded the same file first
                continue
            action = "template.create"
        else:
            wanted = _file_template(path, entry, created_at=existing.created_at, updated_at=now)
            if wanted.model_dump(exclude={"updated_at"}) == existing.model_dump(
                exclude={"updated_at"}
            ):
                continue
            template = await cp.store.update_template(wanted)
            action = "template.update"
        await audit(cp, "system", action, f"template/{entry.name}", {"source": str(path)})
        changed.append(template)
    if changed:
        logger.info(
            "Loaded %d template(s) from %s: %s",
            len(changed),
            path,
            ", ".join(t.name for t in changed),
        )
    return changed


def _file_template(path: object, entry: TemplateCreate, **times: Any) -> Template:
    try:
        return Template(**entry.model_dump(), **times)
    except ValidationError as exc:
        raise ConfigError(f"TEMPLATES_FILE: {path}: {entry.name!r}: {_describe(exc)}") from None
