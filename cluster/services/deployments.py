"""Deployment configs (versioned) and deployments: the promotion gate, generations started beside the serving one, probed, then routed."""

from __future__ import annotations

import logging
import os
import time

from cluster import kuberay
from cluster.entities import (ModelDeployment, ModelDeploymentConfig, ModelEntity, ModelProvider, StatusChange,
                              Workspace, now)
from rayembed import storage
from rayembed.artifact import GRAPH_FP16, GRAPH_INT8
from cluster.services.base import PENDING_TIMEOUT_S, RETIRE_AFTER_S, Context, Service, check_body, check_name, validated
from cluster.services.verification import VerificationService
from rayembed.errors import Conflict, InvalidRequest, NotFound, PromotionRefused, shown

log = logging.getLogger(__name__)


class DeploymentService(Service):
    """Deployment configs and deployments, and reconciling each deployment against Serve (ctx.serve); a READY
    generation is scored by the verification service before its routes move."""

    def __init__(self, ctx: Context, verification: VerificationService):
        super().__init__(ctx)
        self.verification = verification
        self._graphs: set[tuple] = set()  # (artifact, digest, graph) found in storage: a sealed artifact never changes
        self._started_apps: set[str] = set()  # Serve applications this incarnation deployed

    # ---------------------------------------------------------------- deployment configs
    def create_deployment_config(self, workspace: str, body: dict) -> dict:
        self.ctx.workspace(workspace)
        name = check_body("create_deployment_config", body)["name"]
        cfg = validated(ModelDeploymentConfig, body, "deployment config", workspace=workspace, version=1)
        self._model_for(workspace, cfg.model)
        self.ctx.admitted(workspace, lambda: self.ctx.create(cfg), lambda _: self.ctx.remove(cfg))
        self.store.add_version("deployment_config", workspace, name, 1, cfg.model_dump(mode="json"))
        return cfg.model_dump(mode="json")

    def update_deployment_config(self, workspace: str, name: str, body: dict) -> dict:
        body = check_body("update_deployment_config", body)
        cfg = self.ctx.modify(lambda: self.ctx.load("deployment_config", self.ctx.workspace(workspace), name,
                                                    ModelDeploymentConfig), lambda old: self._next_version(old, body))
        self.store.add_version("deployment_config", workspace, name, cfg.version, cfg.model_dump(mode="json"))
        return cfg.model_dump(mode="json")

    def _next_version(self, old: ModelDeploymentConfig, changes: dict) -> ModelDeploymentConfig:
        merged = {**old.model_dump(mode="json", exclude={"created_at", "updated_at"}), **changes}
        cfg = validated(ModelDeploymentConfig, merged, "deployment config", workspace=old.workspace, name=old.name,
                        version=old.version + 1, created_at=old.created_at, updated_at=old.updated_at)
        self._model_for(old.workspace, cfg.model)
        return cfg

    def get_deployment_config(self, workspace: str, name: str) -> dict:
        self.ctx.workspace(workspace)
        cfg = self.ctx.load("deployment_config", workspace, name, ModelDeploymentConfig).model_dump(mode="json")
        cfg["versions"] = self.ctx.config_versions(workspace, name, self.store.get("deployment_config", workspace, name))
        return cfg

    def list_deployment_configs(self, workspace: str) -> list[dict]:
        self.ctx.workspace(workspace)
        return [c.model_dump(mode="json") for c in self.ctx.all("deployment_config", ModelDeploymentConfig, workspace)]

    def delete_deployment_config(self, workspace: str, name: str) -> dict:
        def attempt() -> ModelDeploymentConfig:
            cfg = self.ctx.load("deployment_config", self.ctx.workspace(workspace), name, ModelDeploymentConfig)
            users = [d.name for d in self.ctx.all("deployment", ModelDeployment, workspace) if d.config == name]
            if users:
                raise Conflict(f"deployment config {name!r} is used by {', '.join(users)}")
            if not self.ctx.remove(cfg):
                raise Conflict(f"deployment config {name!r} changed while it was being deleted; try again")
            return cfg

        self.ctx.admitted(workspace, attempt, lambda cfg: self.ctx.create(cfg))
        return {"name": name, "deleted": True}

    # ---------------------------------------------------------------- deployments
    def _model_for(self, workspace: str, name: str) -> ModelEntity:
        model = self.ctx.load("model", workspace, check_name(name, "model"), ModelEntity)
        if model.status != "ready" or model.artifact is None:
            raise Conflict(f"model {name!r} is {model.status}" + (f": {model.error}" if model.error else "; wait until it is ready"))
        return model

    def _gate(self, model: ModelEntity, allow_worse: bool, cfg: ModelDeploymentConfig) -> None:
        """Promotion gate, on the job's interval: a model whose interval lies below zero (`worse`) is not deployed, nor,
        where the config requires `improved`, one whose interval does not lie above it, without `allow_worse`. And the
        graph the config asks for must be in the model's artifact (a storage read, remembered once
        found), and its default size one the model serves."""
        self._graph_in_artifact(model, cfg.precision)
        sizes = sorted(set(model.matryoshka_dims) | ({model.embedding_dim} if model.embedding_dim else set()))
        if cfg.default_dimensions is not None and sizes and cfg.default_dimensions not in sizes:
            raise InvalidRequest(f"default_dimensions {cfg.default_dimensions} is not one of model {model.name!r}'s "
                                 f"sizes {sizes}", "default_dimensions")
        ev = model.evaluation
        if allow_worse:
            return
        if ev is not None and ev.verdict == "worse":
            raise PromotionRefused(f"model {model.name!r} is worse than its base model: {ev.summary()}. "
                                   "Deploy it anyway with allow_worse: true, or train again", "model")
        if ev is not None and ev.verdict == "improved":
            return
        ws = Workspace.model_validate(self.store.get("workspace", "", model.workspace) or {"name": model.workspace})
        who = (f"deployment config {cfg.name!r}" if cfg.require_improved else
               f"workspace {ws.name!r} (its operator's policy)" if ws.require_improved else None)
        if who:
            why = (f"is {ev.verdict}: {ev.summary()}" + (f"; {ev.note}" if ev.note else "")) if ev else "has no evaluation"
            raise PromotionRefused(f"{who} requires an improved model (a 95% interval above zero); model "
                                   f"{model.name!r} {why}. Evaluate on more queries or train again, or deploy it anyway "
                                   "with allow_worse: true", "model")

    def _graph_in_artifact(self, model: ModelEntity, precision: str) -> None:
        """The graph `precision` names is in the model's artifact (a storage read; a sealed artifact never changes)."""
        graph = {"int8": GRAPH_INT8, "fp16": GRAPH_FP16}.get(precision)
        if not graph:
            return
        key = (model.artifact.uri, model.artifact.sha256, graph)
        if key not in self._graphs and storage.is_file(storage.join(model.artifact.uri, graph)):
            self._graphs.add(key)  # only a graph found is remembered: one written later is found then
        if key not in self._graphs:
            how = ("`python -m train.quantize --model-dir DIR --eval BEIR_DIR`, or output.export_int8 in the job"
                   if graph == GRAPH_INT8 else "export_fp16: true in the job")
            raise InvalidRequest(f"precision {precision} needs {graph} in model {model.name!r}'s artifact "
                                 f"({model.artifact.uri}); write it with {how}, or use precision auto", "precision")

    def create_deployment(self, workspace: str, body: dict) -> dict:
        self.ctx.workspace(workspace)
        name = check_body("create_deployment", body)["name"]
        allow_worse = bool(body.get("allow_worse", False))
        inline = "config" not in body

        def attempt() -> tuple[ModelDeployment, ModelDeploymentConfig | None]:
            if self.store.get("deployment", workspace, name) is not None:
                raise Conflict(f"deployment {name!r} already exists in workspace {workspace!r}")
            if not inline:
                cfg = self.ctx.load("deployment_config", workspace, check_name(body["config"], "deployment config"),
                                    ModelDeploymentConfig)
            else:  # inline settings: a config of the deployment's name, owned by it
                settings = {k: v for k, v in body.items() if k not in ("name", "allow_worse")}
                if self.store.get("deployment_config", workspace, name) is not None:
                    raise Conflict(f"deployment config {name!r} already exists: pass config: {name!r} to use it")
                cfg = validated(ModelDeploymentConfig, {**settings, "name": name}, "deployment config",
                                workspace=workspace, version=1)
            model = self._model_for(workspace, cfg.model)
            self._gate(model, allow_worse, cfg)  # before anything is stored
            self.ctx.quota_for_deployment(workspace, cfg, name)
            if inline:
                self.ctx.create(cfg)
            dep = ModelDeployment(workspace=workspace, name=name, config=cfg.name, config_version=cfg.version,
                                  model=model.name, allow_worse=allow_worse, owns_config=inline,
                                  status_history=[StatusChange(status="CREATED", reason=f"model {model.name}")])
            try:
                self.ctx.create(dep)
            except Conflict:
                if inline:
                    self.ctx.remove(cfg)
                raise
            return dep, cfg if inline else None

        def undo(made: tuple) -> None:
            dep, cfg = made
            self.ctx.remove(dep)
            if cfg is not None:
                self.ctx.remove(cfg)

        dep, cfg = self.ctx.admitted(workspace, attempt, undo)
        if cfg is not None:
            self.store.add_version("deployment_config", workspace, name, 1, cfg.model_dump(mode="json"))
        return dep.model_dump(mode="json")

    def update_deployment(self, workspace: str, name: str, body: dict) -> dict:
        """Point a deployment at another model (or config version): a new generation starts beside the
        old one, and the routes move only once it answers (zero-downtime swap). One admission: the config's next
        version (when the body changes settings) and the deployment's move to it are checked against the quota
        and written together, or neither is."""
        body = check_body("update_deployment", body)
        self.ctx.workspace(workspace)
        dep = self.ctx.load("deployment", workspace, name, ModelDeployment)
        if dep.status == "DELETING":
            raise Conflict(f"deployment {name!r} is being deleted")
        allow_worse = bool(body.get("allow_worse", dep.allow_worse))
        changes = {k: v for k, v in body.items() if k not in ("allow_worse", "config")}
        cfg_name = check_name(body.get("config", dep.config), "deployment config")

        def attempt() -> tuple[tuple, tuple]:
            old = self.ctx.load("deployment_config", workspace, cfg_name, ModelDeploymentConfig)
            cfg = self._next_version(old, changes) if changes else old
            # the version it moves to meets the quota and the gate, whether this request writes it or it was
            # edited through its config (PATCH .../deployment-configs/NAME) since the deployment last moved
            self.ctx.quota_for_deployment(workspace, cfg, name)
            model = self._model_for(workspace, cfg.model)
            self._gate(model, allow_worse, cfg)
            if changes and (cfg := self.ctx.replace(old, cfg)) is None:
                raise Conflict(f"deployment config {cfg_name!r} changed while this update ran; try again")
            try:
                before, after = self._move(workspace, name, cfg, model, allow_worse)
            except Exception:
                if changes:
                    self.ctx.replace(cfg, old)  # the version before, as it was
                raise
            return (old, cfg), (before, after)

        def undo(made: tuple[tuple, tuple]) -> None:
            (old, cfg), (before, after) = made
            if after is not before:  # only the fields this request set go back (a reconcile may have moved it since)
                self.ctx.modify(lambda: self.ctx.load("deployment", workspace, name, ModelDeployment),
                                lambda d: d.model_copy(update={k: getattr(before, k) for k in (
                                    "config", "config_version", "pending_model", "allow_worse")}))
            if cfg is not old and self.ctx.replace(cfg, old) is None:
                log.warning("deployment config %s/%s v%d stayed after a lost admission", workspace, cfg_name, cfg.version)

        (_, cfg), (_, dep) = self.ctx.admitted(workspace, attempt, undo)
        if changes:
            self.store.add_version("deployment_config", workspace, cfg_name, cfg.version, cfg.model_dump(mode="json"))
        return dep.model_dump(mode="json")

    def _move(self, workspace: str, name: str, cfg: ModelDeploymentConfig, model: ModelEntity,
              allow_worse: bool) -> tuple[ModelDeployment, ModelDeployment]:
        """The deployment pointed at `model` and `cfg`'s version (compare-and-set): (as it was, as it is)."""
        def change(dep: ModelDeployment) -> ModelDeployment:
            if dep.status == "DELETING":
                raise Conflict(f"deployment {name!r} is being deleted")
            if (dep.status == "READY" and dep.pending_model is None and model.name == dep.model
                    and (cfg.name, cfg.version) == (dep.config, dep.config_version)):
                return dep  # nothing changed: keep serving
            return dep.model_copy(update={
                "config": cfg.name, "config_version": cfg.version, "pending_model": model.name, "allow_worse": allow_worse,
                "status_history": dep.status_history + [StatusChange(
                    status=dep.status, reason=f"update to model {model.name} (config v{cfg.version})")]})

        seen: list[ModelDeployment] = []
        after = self.ctx.modify(lambda: seen.append(self.ctx.load("deployment", workspace, name, ModelDeployment))
                                or seen[-1], change)
        return seen[-1], after

    def _running_config(self, dep: ModelDeployment) -> ModelDeploymentConfig:
        """The config version `dep` records, the one its generations run (an edit of the config since is not)."""
        cfg = self.ctx.config_of(dep)
        if cfg is None:
            raise NotFound(f"deployment config {dep.config!r} does not exist in workspace {dep.workspace!r}")
        return cfg

    def get_deployment(self, workspace: str, name: str) -> dict:
        self.ctx.workspace(workspace)
        return self.ctx.load("deployment", workspace, name, ModelDeployment).model_dump(mode="json")

    def export_deployment(self, workspace: str, name: str, fmt: str, image: str | None = None,
                          k8s_name: str | None = None) -> dict:
        """A manifest that serves the deployment's model elsewhere as it is served here (cluster.kuberay)."""
        if fmt not in kuberay.FORMATS:
            raise InvalidRequest(f"format {shown(fmt)} is not one of {', '.join(kuberay.FORMATS)}", "format")
        self.ctx.workspace(workspace)
        dep = self.ctx.load("deployment", workspace, name, ModelDeployment)
        cfg = self._running_config(dep)
        model = self._model_for(workspace, dep.model)
        return kuberay.rayservice(dep, cfg, model, image=image or os.environ.get("RAYEMBED_IMAGE"), name=k8s_name)

    def list_deployments(self, workspace: str) -> list[dict]:
        self.ctx.workspace(workspace)
        return [d.model_dump(mode="json") for d in self.ctx.all("deployment", ModelDeployment, workspace)]

    def delete_deployment(self, workspace: str, name: str) -> dict:
        dep = self.ctx.modify(lambda: self.ctx.load("deployment", self.ctx.workspace(workspace), name, ModelDeployment),
                              lambda dep: _moved(dep, "DELETING", "deleted by request"))
        if self.store.delete("provider", workspace, name):
            self.ctx.routes.bump()
        return dep.model_dump(mode="json")

    def _status(self, dep: ModelDeployment, status: str, reason: str, **changes) -> ModelDeployment | None:
        """Compare-and-set `dep` to `status`: None when it changed since it was read (the next pass sees it anew)."""
        return self.ctx.replace(dep, _moved(dep, status, reason, **changes))

    def verify_deployment(self, workspace: str, name: str) -> dict:
        """Score the evaluation set through the serving generation again and record it (`rayembed deployments
        verify`). A failure is recorded with its reason; the routes stay where they are (a swap is what moves them)."""
        self.ctx.workspace(workspace)
        dep = self.ctx.load("deployment", workspace, name, ModelDeployment)
        if dep.status != "READY" or dep.app is None:
            raise Conflict(f"deployment {name!r} is {dep.status}; only a READY deployment's replicas can be verified")
        cfg = self._running_config(dep)
        model = self.ctx.load("model", workspace, dep.model, ModelEntity)
        verification = self.verification.verify(dep.app, model, cfg, dep.allow_worse, dep.generation, force=True)

        def change(current: ModelDeployment) -> ModelDeployment:
            if current.app != dep.app:
                raise Conflict(f"deployment {name!r} moved to {current.app} while {dep.app} was verified; verify again")
            return _moved(current, current.status, f"verified again: {verification.reason}"[:1000], verification=verification)

        return self.ctx.modify(lambda: self.ctx.load("deployment", workspace, name, ModelDeployment), change).model_dump(mode="json")

    def search_deployment(self, workspace: str, name: str, body: dict) -> dict:
        """Side-by-side search (cluster/search.py): the query against the deployment's model's evaluation corpus,
        ranked by its replicas and, with `compare_with`, by another deployment's."""
        from cluster import search

        self.ctx.workspace(workspace)
        req = search.SearchRequest.model_validate(check_body("search_deployment", body))
        deps = [self.ctx.load("deployment", workspace, d, ModelDeployment) for d in [name, req.compare_with] if d]
        for dep in deps:
            if dep.status != "READY" or dep.app is None:
                raise Conflict(f"deployment {dep.name!r} is {dep.status}; search needs a READY deployment")
        evaluation = self.ctx.load("model", workspace, deps[0].model, ModelEntity).evaluation
        if evaluation is None:
            raise Conflict(f"model {deps[0].model!r} has no evaluation set to search (a base model, or an artifact "
                           "registered without its job's eval.json): search from the tuned model's deployment")
        sides = [(d.name, d.model, d.app, self.ctx.serve.embedder(d.app)) for d in deps]
        return search.search(sides, evaluation.dataset, req)

    # ---------------------------------------------------------------- the reconcile step
    def reconcile(self, dep: ModelDeployment, apps: dict[str, tuple[str, str]]) -> None:
        """A deployment against Serve's applications (`apps`: name -> (status, message)): start a generation, watch
        it come up, probe and verify it, move the routes, retire the old one; or delete everything it ran."""
        if dep.status == "DELETING":
            self._reconcile_delete(dep, apps)
            return
        due = [a for a, at in dep.retiring.items() if at <= time.time()]
        for app in due:
            self.ctx.serve.delete(app)
        if due:
            dep = self.ctx.replace(dep, dep.model_copy(update={"retiring": {a: t for a, t in dep.retiring.items()
                                                                            if a not in due}}))
            if dep is None:
                return  # changed meanwhile: the next pass retires what is still due
        if dep.status == "FAILED" and dep.pending_model is None:
            return
        # a generation to start: the first, a model swap, or a READY app that vanished (cluster restarted)
        lost = dep.status == "READY" and dep.app not in apps and dep.pending_app is None
        wants = dep.pending_app is None and (dep.status == "CREATED" or dep.pending_model is not None or lost)
        # a pending generation Serve does not know, deployed by an earlier incarnation of this actor:
        # the cluster went down before it ran (Serve lists an application as soon as it is deployed)
        vanished = dep.pending_app is not None and dep.pending_app not in apps and dep.pending_app not in self._started_apps
        if wants or vanished:
            self._start_generation(dep, lost or (vanished and dep.app not in apps), vanished=dep.pending_app if vanished else None)
            return
        if dep.pending_app is not None:
            self._watch_generation(dep, apps)

    def _start_generation(self, dep: ModelDeployment, lost: bool, vanished: str | None = None) -> None:
        target = dep.pending_model or dep.model
        generation = dep.generation + 1
        try:
            model = self._model_for(dep.workspace, target)
            cfg = self._running_config(dep)
            settings = self.ctx.serve.provider_settings(dep, cfg, model, generation)
        except Exception as exc:  # noqa: BLE001 - recorded on the deployment
            self._status(dep, "FAILED" if dep.status != "READY" else "READY", f"could not start model {target}: {exc}"[:1000],
                         pending_model=None, error=str(exc)[:1000], **_serving_again(dep))
            return
        status = "READY" if dep.status == "READY" and not lost else "PENDING"
        gone = vanished or (dep.app if lost else None)
        reason = (f"application {gone} is gone (the cluster restarted); redeploying as generation {generation}" if gone
                  else f"starting generation {generation} with model {target}")
        # recorded before Serve is called: a deployment changed meanwhile starts nothing (the next pass looks again),
        # and an actor that dies right after leaves a pending app that the next incarnation finds vanished
        started = self._status(dep, status, reason, generation=generation, pending_app=settings.name,
                               pending_model=target, pending_since=now(), error=None)
        if started is None:
            return
        if lost and self.store.delete("provider", dep.workspace, dep.name):
            self.ctx.routes.bump()
        self._started_apps.add(settings.name)
        try:
            self.ctx.serve.start(settings)  # a call to Serve's controller
        except Exception as exc:  # noqa: BLE001 - recorded on the deployment
            why = str(exc)[:1000]
            self.ctx.modify(lambda: self.ctx.load("deployment", dep.workspace, dep.name, ModelDeployment),
                            lambda d: _moved(d, "FAILED" if d.status != "READY" else "READY",
                                             f"could not start model {target}: {why}"[:1000], pending_app=None,
                                             pending_model=None, error=why, **_serving_again(d)))

    def _watch_generation(self, dep: ModelDeployment, apps: dict[str, tuple[str, str]]) -> None:
        status, message = apps.get(dep.pending_app, ("NOT_STARTED", ""))
        failure = None
        if status in ("DEPLOY_FAILED", "UNHEALTHY"):
            failure = f"Serve reports {status}: {message}"[:2000]
        elif status != "RUNNING":
            if time.time() - (dep.pending_since or dep.updated_at) > PENDING_TIMEOUT_S:
                failure = f"not running after {PENDING_TIMEOUT_S:.0f} s (Serve: {status} {message})"[:2000]
            else:
                return
        model = self.store.get("model", dep.workspace, dep.pending_model)
        cfg = self._running_config(dep)
        verification = None
        if failure is None:
            failure = self.ctx.serve.probe(dep.pending_app, cfg.default_dimensions or (model or {}).get("embedding_dim"))
            if failure is not None and time.time() - (dep.pending_since or dep.updated_at) < PENDING_TIMEOUT_S:
                return  # replicas may still be warming up; probe again next tick
        if failure is None and model is not None:  # the evaluation set through the replicas
            verification = self.verification.verify(dep.pending_app, ModelEntity.model_validate(model), cfg,
                                                    dep.allow_worse, dep.generation)
            if not verification.passed and not dep.allow_worse:
                failure = f"verification failed: {verification.reason}"
        if failure is not None:
            self.ctx.serve.delete(dep.pending_app)
            swapping = dep.status == "READY"
            reason = (f"swap to model {dep.pending_model} failed, still serving {dep.model}: " if swapping else "") + failure
            # the deployment's verification stays the serving generation's; a failed swap's is in its reason
            self._status(dep, "READY" if swapping else "FAILED", reason, pending_app=None, pending_model=None,
                         error=failure, **_serving_again(dep),
                         **({"verification": verification} if verification and not swapping else {}))
            return
        old = dep.app
        retiring = dict(dep.retiring)
        if old and old != dep.pending_app:
            retiring[old] = time.time() + RETIRE_AFTER_S
        said = f"; {verification.reason}" if verification else ""
        ready = self._status(dep, "READY", f"model {dep.pending_model} answered a probe embedding{said}"[:1000],
                             app=dep.pending_app, model=dep.pending_model, pending_app=None, pending_model=None,
                             retiring=retiring, error=None, verification=verification,
                             serving_config=dep.config, serving_config_version=dep.config_version)
        if ready is None:
            return  # changed meanwhile (deleted, repointed): the next pass sees it as it is now
        base = f"{self.ctx.base_url}/v2/workspaces/{ready.workspace}/inference/gateway"
        self.ctx.save(ModelProvider(workspace=ready.workspace, name=ready.name, deployment=ready.name, model=ready.model,
                                    app=ready.app, embedding_dim=(model or {}).get("embedding_dim"),
                                    routes={"model": f"{base}/model/{ready.model}/-/v1/embeddings",
                                            "provider": f"{base}/provider/{ready.name}/-/v1/embeddings",
                                            "openai": f"{self.ctx.base_url}/v1/embeddings",
                                            "openai_workspace": f"{base}/openai/-/v1/embeddings"}))
        self.ctx.routes.bump()

    def _reconcile_delete(self, dep: ModelDeployment, apps: dict[str, tuple[str, str]]) -> None:
        mine = [a for a in (dep.app, dep.pending_app, *dep.retiring) if a]
        alive = [a for a in mine if a in apps]
        for app in alive:
            if apps[app][0] != "DELETING":
                self.ctx.serve.delete(app)
        if alive:
            return
        if not self.ctx.remove(dep):
            return
        if dep.owns_config:
            self.store.delete("deployment_config", dep.workspace, dep.config)
        if self.store.delete("provider", dep.workspace, dep.name):
            self.ctx.routes.bump()


def _serving_again(dep: ModelDeployment) -> dict:
    """A swap that failed while the old generation serves: the record goes back to the config version that serves
    (so quotas, verification, export and a redeploy after a restart read what runs)."""
    if dep.status == "READY" and dep.serving_config_version:
        return {"config": dep.serving_config, "config_version": dep.serving_config_version}
    return {}


def _moved(dep: ModelDeployment, status: str, reason: str, **changes) -> ModelDeployment:
    """`dep` in `status`, with the change (and its reason) in its history, the last 50 kept."""
    history = dep.status_history + [StatusChange(status=status, reason=reason)]
    return dep.model_copy(update={"status": status, "status_history": history[-50:], **changes})
