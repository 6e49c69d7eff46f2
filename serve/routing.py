"""The routing table: OpenAI model ids, model entities and provider names -> a provider (no Ray here)."""

from __future__ import annotations

import itertools

from serve.auth import OPEN, Access
from rayembed.errors import InvalidRequest, NotFound, shown
from serve.settings import GatewayConfig, ModelRoute, ProviderSettings

DEFAULT_WORKSPACE = "default"


def _known(names) -> str:
    names = sorted(names)
    if not names:
        return "none is served yet: deploy one first"
    return ", ".join(names[:20]) + (f" and {len(names) - 20} more" if len(names) > 20 else "")


def model_id(route: ModelRoute) -> str:
    """The id /v1/models lists: a bare name in the default workspace, else workspace/name."""
    return route.name if route.workspace == DEFAULT_WORKSPACE else f"{route.workspace}/{route.name}"


class RoutingTable:
    """Immutable once built; the gateway swaps in a new table when the control plane's routes change."""

    def __init__(self, config: GatewayConfig, workspaces: tuple[str, ...] | list[str] = ()):
        self.models = {(m.workspace, m.name): m for m in config.models}
        self.workspaces = {m.workspace for m in config.models} | set(workspaces)
        self.owner = {(m.workspace, p.name): m for m in config.models for p in m.providers}
        self.providers = {(m.workspace, p.name): p for m in config.models for p in m.providers}
        self._turns = {key: itertools.cycle(m.providers) for key, m in self.models.items()}

    # `access` limits what a request sees: another workspace's names are "does not exist", never listed.
    def _workspace(self, workspace: str, access: Access) -> None:
        if workspace not in self.workspaces or not access.allows(workspace):
            known = _known(w for w in self.workspaces if access.allows(w))
            raise NotFound(f"workspace {shown(workspace)} does not exist (known: {known})")

    def entity(self, workspace: str, name: str, access: Access = OPEN) -> tuple[ModelRoute, ProviderSettings]:
        """Route by model entity; several providers of one model take turns."""
        self._workspace(workspace, access)
        route = self.models.get((workspace, name))
        if route is None:
            known = _known(n for w, n in self.models if w == workspace)
            raise NotFound(f"model {shown(name)} does not exist in workspace {workspace!r} (known: {known})", "model")
        return route, next(self._turns[(workspace, name)])

    def provider(self, workspace: str, name: str, access: Access = OPEN) -> tuple[ModelRoute, ProviderSettings]:
        self._workspace(workspace, access)
        route = self.owner.get((workspace, name))
        if route is None:
            known = _known(p for w, p in self.owner if w == workspace)
            raise NotFound(f"provider {shown(name)} does not exist in workspace {workspace!r} (known: {known})")
        return route, self.providers[(workspace, name)]

    def openai(self, model: str | None, access: Access = OPEN) -> tuple[ModelRoute, ProviderSettings]:
        """`model` is workspace/name, or a bare name in the default workspace."""
        if not model:
            raise InvalidRequest("model is required: one of " + _known(self.model_ids(access)), "model")
        workspace, _, name = model.rpartition("/")
        try:
            return self.entity(workspace or DEFAULT_WORKSPACE, name, access)
        except NotFound:
            raise NotFound(f"model {shown(model)} does not exist (known: {_known(self.model_ids(access))})",
                           "model") from None

    def workspace_openai(self, workspace: str, model: str | None, access: Access = OPEN) -> tuple[ModelRoute, ProviderSettings]:
        """`model` is a model entity of `workspace`: its name, or `workspace/name`; another workspace's id is not."""
        self._workspace(workspace, access)
        if not model:
            raise InvalidRequest("model is required: one of " + _known(m.name for m in self.workspace_routes(workspace, access)),
                                 "model")
        named, _, name = model.rpartition("/")
        if named and named != workspace:
            raise InvalidRequest(f"model {shown(model)} names workspace {named!r}; this route serves workspace "
                                 f"{workspace!r}: use /v1/embeddings, or that workspace's own route", "model")
        return self.entity(workspace, name, access)

    def workspace_routes(self, workspace: str, access: Access = OPEN) -> list[ModelRoute]:
        self._workspace(workspace, access)
        return [m for (w, _), m in sorted(self.models.items()) if w == workspace]

    def model_ids(self, access: Access = OPEN) -> list[str]:
        return sorted(model_id(m) for m in self.models.values() if access.allows(m.workspace))

    def listing(self, routes: list[ModelRoute] | None = None, access: Access = OPEN) -> dict:
        routes = [m for m in self.models.values() if access.allows(m.workspace)] if routes is None else routes
        return {"object": "list", "data": [
            {"id": model_id(m), "object": "model", "created": 0, "owned_by": m.workspace,
             "providers": [p.name for p in m.providers]} for m in routes]}
