"""Workspaces, API keys, and the providers and routing table the gateway follows."""

from __future__ import annotations

import logging
import uuid

from cluster.entities import DEFAULT_WORKSPACE, ApiKey, ModelProvider, Quota, Workspace
from serve import auth
from cluster.services.base import WHAT, Service, check_body, validated
from rayembed import storage
from rayembed.errors import Conflict, InvalidRequest, NotFound, shown
from rayembed.locations import LocationError, parse

AUTH = ("setting", "", "auth")  # the store's record of the auth mode: {"open": bool}

log = logging.getLogger(__name__)


class WorkspaceService(Service):
    """Workspaces and keys (keys only through Ray: `rayembed keys`), providers and the gateway's routes."""

    # ---------------------------------------------------------------- API keys (Ray callers only: `rayembed keys`)
    def create_key(self, workspaces: list[str], label: str = "") -> dict:
        """A key for `workspaces` (["*"]: all, an admin key). Returns the key itself, this once."""
        if not workspaces:
            raise InvalidRequest("a key needs at least one workspace, or all of them (*)", "workspaces")
        if auth.ALL not in workspaces:
            for w in workspaces:
                self.ctx.workspace(w)
        key_id, key, sha = auth.new_key()
        record = ApiKey(id=key_id, sha256=sha, workspaces=sorted(set(workspaces)), label=str(label)[:200])
        self.store.put(*AUTH, {"open": False})  # from the first key on, for good: revoking the last one keeps it closed
        self.store.put("apikey", "", key_id, record.model_dump(mode="json"), expect=None)  # a fresh random id
        self.store.put(*AUTH, {"open": False})  # again, after the key: an `up --open` meanwhile cannot outlast it
        self.ctx.routes.bump()
        return {**record.public(), "key": key}

    def open_mode(self) -> bool:
        """True only while the operator chose open mode (`rayembed up --open`, loopback only) and no key was made since."""
        return bool((self.store.get(*AUTH) or {}).get("open"))

    def set_open_mode(self, open_: bool) -> dict:
        """`rayembed up --open` (True) or plain `up` (False). Open mode needs zero keys: it is never the result of
        revoking keys, only of the operator's choice (the CLI refuses it on a non-loopback bind)."""
        if open_ and self.store.list("apikey"):
            raise Conflict("API keys exist, so the API stays closed: revoke them all first (`rayembed keys list`), "
                           "then `rayembed up --open` again")
        self.store.put(*AUTH, {"open": bool(open_)})
        self.ctx.routes.bump()
        if open_ and self.store.list("apikey"):  # a key created meanwhile (it closes the API after itself, too)
            self.store.put(*AUTH, {"open": False})
            raise Conflict("an API key was created meanwhile, so the API stays closed")
        return {"open": bool(open_)}

    def list_keys(self) -> list[dict]:
        return [ApiKey.model_validate(b).public() for b in self.store.list("apikey")]

    def revoke_key(self, key_id: str) -> dict:
        if not self.store.delete("apikey", "", str(key_id)):
            raise NotFound(f"API key {shown(key_id)} does not exist (`rayembed keys list` shows the ids)")
        self.ctx.routes.bump()
        return {"id": key_id, "revoked": True}

    # ---------------------------------------------------------------- workspaces
    def list_workspaces(self) -> list[dict]:
        return [w.model_dump(mode="json") for w in self.ctx.all("workspace", Workspace)]

    def create_workspace(self, body: dict) -> dict:
        body = check_body("create_workspace", body)
        ws = validated(Workspace, body, "workspace", uid=uuid.uuid4().hex[:12])
        self.ctx.create(ws, "workspace")
        self.ctx.routes.bump()
        return ws.model_dump(mode="json")

    def get_workspace(self, name: str) -> dict:
        self.ctx.workspace(name)
        return self.store.get("workspace", "", name)

    def delete_workspace(self, name: str) -> dict:
        if name == DEFAULT_WORKSPACE:
            raise Conflict("the default workspace cannot be deleted")
        ws = Workspace.model_validate(self.store.get("workspace", "", self.ctx.workspace(name)))
        used = [k for k in ("model", "dataset", "job", "deployment_config", "deployment") if self.store.list(k, name)]
        if used:
            raise Conflict(f"workspace {name!r} still holds {', '.join(WHAT[k] + 's' for k in used)}; delete them first")
        keys = [k["id"] for k in self.store.list("apikey") if name in k["workspaces"]]
        if keys:  # a key would otherwise regain access to a workspace created later under the same name
            raise Conflict(f"workspace {name!r} is in the scope of API keys {', '.join(keys)}; revoke them first "
                           "(`rayembed keys revoke ID`)")
        root = self.ctx.workspace_root(name)
        if not self.ctx.remove(ws):  # an admission into it (a new dataset, job...) since it was read
            raise Conflict(f"workspace {name!r} changed while it was being deleted; try again")
        if any(self.store.list(k, name) for k in ("model", "dataset", "job", "deployment_config", "deployment")):
            self.ctx.save(ws)  # an entity created in the same instant: the workspace stays, with it
            raise Conflict(f"workspace {name!r} got a new entity while it was being deleted; delete it first")
        self.ctx.routes.bump()
        storage.delete_tree(root)  # a workspace made again under this name gets a new folder anyway
        return {"name": name, "deleted": True}

    # ---------------------------------------------------------------- grants and quotas (Ray callers only: the operator)
    def grant_data(self, workspace: str, prefix: str) -> dict:
        """Let `workspace`'s jobs read under `prefix` (a folder or a URI such as s3://team-a-data/), parsed by the
        one location parser; refused where it overlaps the storage root (every workspace's files)."""
        try:
            loc = parse(str(prefix), "prefix")
            if loc.overlaps(parse(self.ctx.storage, "the storage root")) or loc.overlaps(parse(str(self.ctx.home), "RAYEMBED_HOME")):
                raise LocationError(f"prefix {prefix} overlaps the storage root or RAYEMBED_HOME, which hold every "
                                    "workspace's files")
        except LocationError as exc:
            raise InvalidRequest(str(exc), "prefix") from None
        ws = self._change(workspace, lambda ws: ws.model_copy(update={"data_grants": sorted({*ws.data_grants, str(loc)})}))
        return ws.model_dump(mode="json")

    def revoke_grant(self, workspace: str, prefix: str) -> dict:
        try:
            gone = str(parse(str(prefix), "prefix"))
        except LocationError as exc:
            raise InvalidRequest(str(exc), "prefix") from None

        def change(ws: Workspace) -> Workspace:
            if gone not in ws.data_grants:
                raise NotFound(f"workspace {workspace!r} has no grant {shown(prefix)} (grants: {', '.join(ws.data_grants) or 'none'})")
            return ws.model_copy(update={"data_grants": [g for g in ws.data_grants if g != gone]})

        return self._change(workspace, change).model_dump(mode="json")

    def set_quota(self, workspace: str, changes: dict) -> dict:
        """Change some of `workspace`'s limits (cluster.entities.Quota); the rest stay."""
        def change(ws: Workspace) -> Workspace:
            return ws.model_copy(update={"quota": validated(Quota, {**ws.quota.model_dump(), **changes}, "quota")})

        return self._change(workspace, change).model_dump(mode="json")

    def set_policy(self, workspace: str, require_improved: bool) -> dict:
        """Whether every deployment in `workspace` requires an improved model (the promotion gate, DeploymentService)."""
        if not isinstance(require_improved, bool):
            raise InvalidRequest(f"require_improved must be true or false, not {shown(require_improved)}", "require_improved")
        return self._change(workspace, lambda ws: ws if ws.require_improved == require_improved else
                            ws.model_copy(update={"require_improved": require_improved})).model_dump(mode="json")

    def _change(self, workspace: str, change) -> Workspace:
        return self.ctx.modify(lambda: Workspace.model_validate(self.store.get("workspace", "", self.ctx.workspace(workspace))),
                               change)

    # ---------------------------------------------------------------- providers and routes
    def list_providers(self, workspace: str) -> list[dict]:
        self.ctx.workspace(workspace)
        return [p.model_dump(mode="json") for p in self.ctx.all("provider", ModelProvider, workspace)]

    def get_provider(self, workspace: str, name: str) -> dict:
        self.ctx.workspace(workspace)
        return self.ctx.load("provider", workspace, name, ModelProvider).model_dump(mode="json")

    def routes(self, known_version: int | None = None) -> dict | None:
        """The gateway's routing table (None when `known_version` is current): READY providers by model entity."""
        version = self.ctx.routes.version
        if known_version == version:
            return None
        by_model: dict[tuple[str, str], list[dict]] = {}
        for p in self.ctx.all("provider", ModelProvider):
            by_model.setdefault((p.workspace, p.model), []).append({"name": p.name, "app": p.app})
        models = [{"workspace": w, "name": m, "providers": ps} for (w, m), ps in sorted(by_model.items())]
        workspaces = [w.name for w in self.ctx.all("workspace", Workspace)]
        keys = [{k: b[k] for k in ("id", "sha256", "workspaces")} for b in self.store.list("apikey")]
        return {"version": version, "workspaces": workspaces, "config": {"models": models}, "keys": keys,
                "open": self.open_mode() and not keys}
