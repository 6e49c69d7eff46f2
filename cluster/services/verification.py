"""Verification of a served model: the job's evaluation set through a generation's own replicas at READY (before
its routes move), and again on request (`rayembed deployments verify NAME`, in the deployments service). The
scoring is cluster/verify.py; the replicas are reached through ctx.serve."""

from __future__ import annotations

from cluster import verify as scoring
from cluster.entities import ModelDeploymentConfig, ModelEntity, Verification
from cluster.services.base import Service


class VerificationService(Service):
    """Scores a deployment's replicas against its model's own evaluation."""

    def verify(self, app: str, model: ModelEntity, cfg: ModelDeploymentConfig, allow_worse: bool, generation: int,
               force: bool = False) -> Verification:
        """The job's evaluation set scored through `app`'s replicas (cluster/verify.py)."""
        fields = {"model": model.name, "generation": generation}
        if model.evaluation is None:
            return scoring.skipped("no evaluation to compare with (a base model, or an artifact registered without its "
                                   "job's eval.json)", dims=cfg.default_dimensions, **fields)
        if not cfg.verify and not force:
            return Verification(passed=True, reason=f"not verified: deployment config {cfg.name!r} has verify: false",
                                dims=cfg.default_dimensions, **fields)
        try:
            return scoring.verify(self.ctx.serve.embedder(app), self.ctx.serve.replica_info(app), model.evaluation,
                                  cfg.default_dimensions, allow_worse, **fields)
        except Exception as exc:  # noqa: BLE001 - recorded: a served model that cannot be scored is not verified
            return Verification(passed=False, reason=f"could not verify: {type(exc).__name__}: {exc}"[:1000],
                                dims=cfg.default_dimensions, **fields)
