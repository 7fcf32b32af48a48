"""Build the Starlette application of one control-plane process."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from starlette.applications import Starlette

from streamspace_controlplane import http
from streamspace_controlplane.core import ControlPlane, SessionEvents
from streamspace_controlplane.dispatcher import Dispatcher
from streamspace_controlplane.hub.base import Hub, Notice
from streamspace_controlplane.reconciler import Reconciler
from streamspace_controlplane.routes import agents as agent_routes
from streamspace_controlplane.routes import api as api_routes
from streamspace_controlplane.routes import health as health_routes
from streamspace_controlplane.routes import ui as ui_routes
from streamspace_controlplane.routes import vnc as vnc_routes
from streamspace_controlplane.scheduler import Scheduler
from streamspace_controlplane.services import templates as template_service
from streamspace_controlplane.services import tunnels as tunnel_service
from streamspace_controlplane.services import users as user_service
from streamspace_controlplane.settings import ControlPlaneSettings
from streamspace_controlplane.store.base import Store
from streamspace_sdk.drivers import HUBS, STORES, load_driver
from streamspace_sdk.hooks import Hooks, make_plugin_manager

__all__ = ["build_control_plane", "create_app"]

logger = logging.getLogger("streamspace.controlplane")


def build_control_plane(
    settings: ControlPlaneSettings,
    *,
    store: Store | None = None,
    hub: Hub | None = None,
    hooks: Hooks | None = None,
) -> ControlPlane:
    """Build the process's parts from settings; ``store``/``hub``/``hooks`` override drivers."""
    if store is None:
        store = load_driver(STORES, settings.store_driver, settings=settings, base=Store)
    if hub is None:
        hub = load_driver(HUBS, settings.agent_hub_backend, settings=settings, base=Hub)
    if hooks is None:
        hooks = Hooks(make_plugin_manager())
    cp = ControlPlane(
        settings=settings,
        store=store,
        hub=hub,
        hooks=hooks,
        jwt_secret=settings.resolve_jwt_secret(),
        events=SessionEvents(store, hooks, hub),
    )
    scheduler, reconciler, dispatcher = Scheduler(cp), Reconciler(cp), Dispatcher(cp)
    cp.scheduler, cp.reconciler = scheduler, reconciler
    cp.background = [dispatcher, scheduler, reconciler]

    def on_notice(notice: Notice, arg: str) -> None:
        # Acted on here, never forwarded again: two replicas with stale entries for an
        # agent must not bounce a wake between them.
        if notice == "wake":
            if hub.local(arg) is not None:
                dispatcher.wake(arg)
        elif notice == "schedule":
            scheduler.kick()
        elif notice == "reconcile":
            reconciler.kick()
        elif notice == "event":
            cp.events.poke(arg)
        elif notice == "revoke":
            tunnel_service.apply_revocation(cp, arg)
        else:  # "lead": a new leader catches up at once
            scheduler.kick()
            reconciler.kick()

    hub.on_notice(on_notice)
    return cp


def create_app(cp: ControlPlane) -> Starlette:
    """Return the ASGI app; its lifespan connects the store and runs the background loops."""

    @asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        await cp.store.connect()
        try:
            applied = await cp.store.migrate()
            if applied:
                logger.info("Applied store migrations %s", applied)
            await user_service.ensure_admin(cp)
            await template_service.load_templates_file(cp)
            await cp.hub.start()
            for part in cp.background:
                await part.start()
            try:
                yield
            finally:
                for part in reversed(cp.background):
                    await part.stop()
                await cp.hub.stop()
        finally:
            await cp.store.close()

    app = Starlette(
        routes=[
            *health_routes.routes(),
            *api_routes.routes(),
            *agent_routes.routes(),
            *vnc_routes.routes(),
            *ui_routes.routes(),
        ],
        exception_handlers=http.exception_handlers(),
        lifespan=lifespan,
    )
    app.state.cp = cp
    return app
