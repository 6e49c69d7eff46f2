"""Deployment configs (versioned) and deployments: the promotion gate, generations started beside the serving one, probed, then routed."""

from __future__ import annotations

import logging
import os
import time

from cluster import deployments, kuberay
from cluster.entities import ModelDeployment, ModelDeploymentConfig, ModelEntity, ModelProvider, StatusChange, now
from cluster.schemas import DeploymentConfigCreate, DeploymentConfigUpdate, DeploymentCreate, DeploymentUpdate
from rayembed import storage
from rayembed.artifact import GRAPH_FP16, GRAPH_INT8
from cluster.services.base import PENDING_TIMEOUT_S, RETIRE_AFTER_S, Core, check_name, validated
from rayembed.errors import Conflict, InvalidName, InvalidRequest, NotFound, PromotionRefused, shown

log = logging.getLogger(__name__)


class DeploymentService(Core):
    """Deployment configs and deployments, and reconciling each deployment against Serve."""

    # ---------------------------------------------------------------- deployment configs
    def create_deployment_config(self, workspace: str, body: dict) -> dict:
        self._workspace(workspace)
        name = check_name(body.get("name"), "deployment config")
        validated(DeploymentConfigCreate, body, "deployment config")
        with self._lock:
            if self.store.get("deployment_config", workspace, name) is not None:
                raise Conflict(f"deployment config {name!r} already exists in workspace {workspace!r}")
            cfg = validated(ModelDeploymentConfig, body, "deployment config", workspace=workspace, version=1)
            self._model_for(workspace, cfg.model)
            self._save(cfg)
            self.store.add_version("deployment_config", workspace, name, 1, cfg.model_dump(mode="json"))
        return cfg.model_dump(mode="json")

    def update_deployment_config(self, workspace: str, name: str, body: dict) -> dict:
        validated(DeploymentConfigUpdate, body, "deployment config change")
        with self._lock:
            self._workspace(workspace)
            old = self._load("deployment_config", workspace, name, ModelDeploymentConfig)
            merged = {**old.model_dump(mode="json", exclude={"created_at", "updated_at"}), **body}
            cfg = validated(ModelDeploymentConfig, merged, "deployment config", workspace=workspace, name=name,
                          version=old.version + 1, created_at=old.created_at)
            self._model_for(workspace, cfg.model)
            self._save(cfg)
            self.store.add_version("deployment_config", workspace, name, cfg.version, cfg.model_dump(mode="json"))
        return cfg.model_dump(mode="json")

    def get_deployment_config(self, workspace: str, name: str) -> dict:
        self._workspace(workspace)
        cfg = self._load("deployment_config", workspace, name, ModelDeploymentConfig).model_dump(mode="json")
        cfg["versions"] = self.store.versions("deployment_config", workspace, name)
        return cfg

    def list_deployment_configs(self, workspace: str) -> list[dict]:
        self._workspace(workspace)
        return [c.model_dump(mode="json") for c in self._all("deployment_config", ModelDeploymentConfig, workspace)]

    def delete_deployment_config(self, workspace: str, name: str) -> dict:
        with self._lock:
            self._workspace(workspace)
            self._load("deployment_config", workspace, name, ModelDeploymentConfig)
            users = [d.name for d in self._all("deployment", ModelDeployment, workspace) if d.config == name]
            if users:
                raise Conflict(f"deployment config {name!r} is used by {', '.join(users)}")
            self.store.delete("deployment_config", workspace, name)
        return {"name": name, "deleted": True}

    # ---------------------------------------------------------------- deployments
    def _model_for(self, workspace: str, name: str) -> ModelEntity:
        model = self._load("model", workspace, check_name(name, "model"), ModelEntity)
        if model.status != "ready" or model.artifact is None:
            raise Conflict(f"model {name!r} is {model.status}" + (f": {model.error}" if model.error else "; wait until it is ready"))
        return model

    def _gate(self, model: ModelEntity, allow_worse: bool, cfg: ModelDeploymentConfig) -> None:
        """Promotion gate, on the job's interval: a model whose interval lies below zero (`worse`) is not deployed, nor,
        where the config requires `improved`, one whose interval does not lie above it, without `allow_worse`. And the
        graph the config asks for must be in the model's artifact (checked by `_graph_in_artifact` before the lock was
        taken: a storage read), and its default size one the model serves."""
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
        if cfg.require_improved and (ev is None or ev.verdict != "improved"):
            why = (f"is {ev.verdict}: {ev.summary()}" + (f"; {ev.note}" if ev.note else "")) if ev else "has no evaluation"
            raise PromotionRefused(f"deployment config {cfg.name!r} requires an improved model (a 95% interval above "
                                   f"zero); model {model.name!r} {why}. Evaluate on more queries or train again, or "
                                   "deploy it anyway with allow_worse: true", "model")

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

    def _check_graph_first(self, workspace: str, model: str | None, config: str | None, precision: str | None) -> None:
        """Before the lock: look the requested graph up in storage, so `_gate` under the lock finds it remembered.
        Anything that does not resolve here is left to the checks under the lock, which name it."""
        try:
            cfg = self._load("deployment_config", workspace, config, ModelDeploymentConfig) if config else None
            name = model or (cfg.model if cfg else None)
            entity = self._load("model", workspace, name, ModelEntity) if name else None
        except (NotFound, InvalidName):
            return
        wanted = precision or (cfg.precision if cfg else None)
        if entity is not None and entity.artifact is not None and wanted:
            self._graph_in_artifact(entity, wanted)

    def create_deployment(self, workspace: str, body: dict) -> dict:
        self._workspace(workspace)
        name = check_name(body.get("name"), "deployment")
        validated(DeploymentCreate, body, "deployment")
        allow_worse = bool(body.get("allow_worse", False))
        self._check_graph_first(workspace, body.get("model"), body.get("config"), body.get("precision"))
        with self._lock:
            if self.store.get("deployment", workspace, name) is not None:
                raise Conflict(f"deployment {name!r} already exists in workspace {workspace!r}")
            inline = "config" not in body
            if not inline:
                cfg = self._load("deployment_config", workspace, check_name(body["config"], "deployment config"),
                                 ModelDeploymentConfig)
            else:  # inline settings: a config of the deployment's name, owned by it
                settings = {k: v for k, v in body.items() if k not in ("name", "allow_worse")}
                if self.store.get("deployment_config", workspace, name) is not None:
                    raise Conflict(f"deployment config {name!r} already exists: pass config: {name!r} to use it")
                cfg = validated(ModelDeploymentConfig, {**settings, "name": name}, "deployment config",
                              workspace=workspace, version=1)
            model = self._model_for(workspace, cfg.model)
            self._gate(model, allow_worse, cfg)  # before anything is stored
            self._quota_for_deployment(workspace, cfg, name)
            if inline:
                self._save(cfg)
                self.store.add_version("deployment_config", workspace, name, 1, cfg.model_dump(mode="json"))
            dep = ModelDeployment(workspace=workspace, name=name, config=cfg.name, config_version=cfg.version,
                                  model=model.name, allow_worse=allow_worse, owns_config=inline,
                                  status_history=[StatusChange(status="CREATED", reason=f"model {model.name}")])
            self._save(dep)
        return dep.model_dump(mode="json")

    def update_deployment(self, workspace: str, name: str, body: dict) -> dict:
        """Point a deployment at another model (or config version): a new generation starts beside the
        old one, and the routes move only once it answers (zero-downtime swap)."""
        validated(DeploymentUpdate, body, "deployment change")
        current = self.store.get("deployment", workspace, name) or {}
        self._check_graph_first(workspace, body.get("model"), body.get("config", current.get("config")),
                                body.get("precision"))
        with self._lock:
            self._workspace(workspace)
            dep = self._load("deployment", workspace, name, ModelDeployment)
            if dep.status == "DELETING":
                raise Conflict(f"deployment {name!r} is being deleted")
            allow_worse = bool(body.get("allow_worse", dep.allow_worse))
            changes = {k: v for k, v in body.items() if k not in ("allow_worse", "config")}
            cfg_name = check_name(body.get("config", dep.config), "deployment config")
            cfg = self._load("deployment_config", workspace, cfg_name, ModelDeploymentConfig)
            if changes:
                merged = {**cfg.model_dump(mode="json", exclude={"created_at", "updated_at"}), **changes}
                self._quota_for_deployment(workspace, validated(ModelDeploymentConfig, merged, "deployment config"), name)
                cfg = ModelDeploymentConfig.model_validate(self.update_deployment_config(workspace, cfg_name, changes))
            model = self._model_for(workspace, cfg.model)
            self._gate(model, allow_worse, cfg)
            if (dep.status == "READY" and dep.pending_model is None and model.name == dep.model
                    and (cfg.name, cfg.version) == (dep.config, dep.config_version)):
                return dep.model_dump(mode="json")  # nothing changed: keep serving
            dep = dep.touched(config=cfg.name, config_version=cfg.version, pending_model=model.name, allow_worse=allow_worse,
                              status_history=dep.status_history + [StatusChange(
                                  status=dep.status, reason=f"update to model {model.name} (config v{cfg.version})")])
            self._save(dep)
        return dep.model_dump(mode="json")

    def get_deployment(self, workspace: str, name: str) -> dict:
        self._workspace(workspace)
        return self._load("deployment", workspace, name, ModelDeployment).model_dump(mode="json")

    def export_deployment(self, workspace: str, name: str, fmt: str, image: str | None = None,
                          k8s_name: str | None = None) -> dict:
        """A manifest that serves the deployment's model elsewhere as it is served here (cluster.kuberay)."""
        if fmt not in kuberay.FORMATS:
            raise InvalidRequest(f"format {shown(fmt)} is not one of {', '.join(kuberay.FORMATS)}", "format")
        self._workspace(workspace)
        dep = self._load("deployment", workspace, name, ModelDeployment)
        cfg = self._load("deployment_config", workspace, dep.config, ModelDeploymentConfig)
        model = self._model_for(workspace, dep.model)
        return kuberay.rayservice(dep, cfg, model, image=image or os.environ.get("RAYEMBED_IMAGE"), name=k8s_name)

    def list_deployments(self, workspace: str) -> list[dict]:
        self._workspace(workspace)
        return [d.model_dump(mode="json") for d in self._all("deployment", ModelDeployment, workspace)]

    def delete_deployment(self, workspace: str, name: str) -> dict:
        with self._lock:
            self._workspace(workspace)
            dep = self._load("deployment", workspace, name, ModelDeployment)
            dep = self._deployment_status(dep, "DELETING", "deleted by request")
            if self.store.delete("provider", workspace, name):
                self._bump_routes()
        return dep.model_dump(mode="json")

    def _deployment_status(self, dep: ModelDeployment, status: str, reason: str, **changes) -> ModelDeployment:
        history = dep.status_history + [StatusChange(status=status, reason=reason)]
        dep = dep.touched(status=status, status_history=history[-50:], **changes)
        self._save(dep)
        return dep


    def _reconcile_deployment(self, dep: ModelDeployment, apps: dict[str, tuple[str, str]]) -> None:
        if dep.status == "DELETING":
            self._reconcile_delete(dep, apps)
            return
        due = [a for a, at in dep.retiring.items() if at <= time.time()]
        for app in due:
            deployments.delete(app)
        if due:
            with self._lock:
                fresh = self._fresh(dep, ModelDeployment)
                if fresh is not None:
                    dep = fresh.touched(retiring={a: t for a, t in fresh.retiring.items() if a not in due})
                    self._save(dep)
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
        try:
            with self._lock:
                model = self._model_for(dep.workspace, target)
                cfg = self._load("deployment_config", dep.workspace, dep.config, ModelDeploymentConfig)
            generation = dep.generation + 1
            settings = deployments.provider_settings(dep, cfg, model, generation)
            self._started_apps.add(settings.name)
            deployments.start(settings)  # outside the lock: a call to Serve's controller
            failure = None
        except Exception as exc:  # noqa: BLE001 - recorded on the deployment
            failure = exc
        with self._lock:
            fresh = self._fresh(dep, ModelDeployment)
        if fresh is None:  # deleted or changed meanwhile: the next pass starts what it wants now
            if failure is None:
                deployments.delete(settings.name)
            return
        with self._lock:
            dep = self._fresh(fresh, ModelDeployment)
            if dep is None:
                return
            if failure is not None:
                self._deployment_status(dep, "FAILED" if dep.status != "READY" else "READY",
                                        f"could not start model {target}: {failure}"[:1000], pending_model=None,
                                        error=str(failure)[:1000])
                return
            status = "READY" if dep.status == "READY" and not lost else "PENDING"
            gone = vanished or (dep.app if lost else None)
            reason = (f"application {gone} is gone (the cluster restarted); redeploying as generation {generation}" if gone
                      else f"starting generation {generation} with model {target}")
            if lost and self.store.delete("provider", dep.workspace, dep.name):
                self._bump_routes()
            self._deployment_status(dep, status, reason, generation=generation, pending_app=settings.name,
                                    pending_model=target, pending_since=now(), error=None)


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
        cfg = self._load("deployment_config", dep.workspace, dep.config, ModelDeploymentConfig)
        verification = None
        if failure is None:
            failure = deployments.probe(dep.pending_app, cfg.default_dimensions or (model or {}).get("embedding_dim"))
            if failure is not None and time.time() - (dep.pending_since or dep.updated_at) < PENDING_TIMEOUT_S:
                return  # replicas may still be warming up; probe again next tick
        if failure is None and model is not None:  # outside the lock: the evaluation set through the replicas
            verification = self._verify(dep.pending_app, ModelEntity.model_validate(model), cfg, dep.allow_worse,
                                        dep.generation)
            if not verification.passed and not dep.allow_worse:
                failure = f"verification failed: {verification.reason}"
        if failure is not None:  # outside the lock: a call to Serve's controller
            deployments.delete(dep.pending_app)
        with self._lock:
            dep = self._fresh(dep, ModelDeployment)
            if dep is None:
                return
            if failure is not None:
                swapping = dep.status == "READY"
                reason = (f"swap to model {dep.pending_model} failed, still serving {dep.model}: " if swapping else "") + failure
                # the deployment's verification stays the serving generation's; a failed swap's is in its reason
                self._deployment_status(dep, "READY" if swapping else "FAILED", reason, pending_app=None,
                                        pending_model=None, error=failure,
                                        **({"verification": verification} if verification and not swapping else {}))
                return
            old = dep.app
            retiring = dict(dep.retiring)
            if old and old != dep.pending_app:
                retiring[old] = time.time() + RETIRE_AFTER_S
            said = f"; {verification.reason}" if verification else ""
            dep = self._deployment_status(dep, "READY", f"model {dep.pending_model} answered a probe embedding{said}"[:1000],
                                          app=dep.pending_app, model=dep.pending_model, pending_app=None,
                                          pending_model=None, retiring=retiring, error=None, verification=verification)
            base = f"{self.base_url}/v2/workspaces/{dep.workspace}/inference/gateway"
            self._save(ModelProvider(workspace=dep.workspace, name=dep.name, deployment=dep.name, model=dep.model,
                                     app=dep.app, embedding_dim=(model or {}).get("embedding_dim"),
                                     routes={"model": f"{base}/model/{dep.model}/-/v1/embeddings",
                                             "provider": f"{base}/provider/{dep.name}/-/v1/embeddings",
                                             "openai": f"{self.base_url}/v1/embeddings"}))
            self._bump_routes()


    def _reconcile_delete(self, dep: ModelDeployment, apps: dict[str, tuple[str, str]]) -> None:
        mine = [a for a in (dep.app, dep.pending_app, *dep.retiring) if a]
        alive = [a for a in mine if a in apps]
        for app in alive:
            if apps[app][0] != "DELETING":
                deployments.delete(app)
        if alive:
            return
        with self._lock:
            if self._fresh(dep, ModelDeployment) is None:
                return
            self.store.delete("deployment", dep.workspace, dep.name)
            if dep.owns_config:
                self.store.delete("deployment_config", dep.workspace, dep.config)
            if self.store.delete("provider", dep.workspace, dep.name):
                self._bump_routes()
