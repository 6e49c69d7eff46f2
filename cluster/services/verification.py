"""Verification of a served model: the job's evaluation set through a generation's own replicas at READY (before
its routes move), and again on request (`rayembed deployments verify NAME`). The scoring is cluster/verify.py."""

from __future__ import annotations

from cluster import deployments, verify
from cluster.entities import ModelDeployment, ModelDeploymentConfig, ModelEntity, Verification
from cluster.services.base import Core, validated
from rayembed.errors import Conflict


class VerificationService(Core):
    """Scores a deployment's replicas against its model's own evaluation; network calls happen outside the lock."""

    def _verify(self, app: str, model: ModelEntity, cfg: ModelDeploymentConfig, allow_worse: bool, generation: int,
                force: bool = False) -> Verification:
        """The job's evaluation set scored through `app`'s replicas (cluster/verify.py); never under the lock."""
        fields = {"model": model.name, "generation": generation}
        if model.evaluation is None:
            return verify.skipped("no evaluation to compare with (a base model, or an artifact registered without its "
                                  "job's eval.json)", dims=cfg.default_dimensions, **fields)
        if not cfg.verify and not force:
            return Verification(passed=True, reason=f"not verified: deployment config {cfg.name!r} has verify: false",
                                dims=cfg.default_dimensions, **fields)
        try:
            return verify.verify(deployments.embedder(app), deployments.replica_info(app), model.evaluation,
                                 cfg.default_dimensions, allow_worse, **fields)
        except Exception as exc:  # noqa: BLE001 - recorded: a served model that cannot be scored is not verified
            return Verification(passed=False, reason=f"could not verify: {type(exc).__name__}: {exc}"[:1000],
                                dims=cfg.default_dimensions, **fields)

    def verify_deployment(self, workspace: str, name: str) -> dict:
        """Score the evaluation set through the serving generation again and record it (`rayembed deployments
        verify`). A failure is recorded with its reason; the routes stay where they are (a swap is what moves them)."""
        self._workspace(workspace)
        dep = self._load("deployment", workspace, name, ModelDeployment)
        if dep.status != "READY" or dep.app is None:
            raise Conflict(f"deployment {name!r} is {dep.status}; only a READY deployment's replicas can be verified")
        cfg = self._load("deployment_config", workspace, dep.config, ModelDeploymentConfig)
        model = self._load("model", workspace, dep.model, ModelEntity)
        verification = self._verify(dep.app, model, cfg, dep.allow_worse, dep.generation, force=True)
        with self._lock:
            current = self._load("deployment", workspace, name, ModelDeployment)
            if current.app != dep.app:
                raise Conflict(f"deployment {name!r} moved to {current.app} while {dep.app} was verified; verify again")
            current = self._deployment_status(current, current.status, f"verified again: {verification.reason}"[:1000],
                                              verification=verification)
        return current.model_dump(mode="json")

    def search_deployment(self, workspace: str, name: str, body: dict) -> dict:
        """Side-by-side search (cluster/search.py): the query against the deployment's model's evaluation corpus,
        ranked by its replicas and, with `compare_with`, by another deployment's; never under the lock."""
        from cluster import search

        self._workspace(workspace)
        req = validated(search.SearchRequest, body, "search")
        deps = [self._load("deployment", workspace, d, ModelDeployment) for d in [name, req.compare_with] if d]
        for dep in deps:
            if dep.status != "READY" or dep.app is None:
                raise Conflict(f"deployment {dep.name!r} is {dep.status}; search needs a READY deployment")
        evaluation = self._load("model", workspace, deps[0].model, ModelEntity).evaluation
        if evaluation is None:
            raise Conflict(f"model {deps[0].model!r} has no evaluation set to search (a base model, or an artifact "
                           "registered without its job's eval.json): search from the tuned model's deployment")
        sides = [(d.name, d.model, d.app, deployments.embedder(d.app)) for d in deps]
        return search.search(sides, evaluation.dataset, req)
