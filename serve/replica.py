"""EmbeddingReplica: a Serve deployment holding one ONNX Runtime session and the model's tokenizer.

Each text is one item of the replica's continuous batcher (serve/batcher.py: ONNX Runtime in a worker thread,
each batch takes what queued while the last one ran), bounded by a token budget (`max_batch_tokens`) and a count
(`max_batch_items`); the batch is then cut into length-sorted ONNX Runtime calls of at most `max_batch_texts`
texts, where the cut weighs padding against each call's fixed cost (`call_tokens`, timed when the replica starts).
"""

from __future__ import annotations

import asyncio

import numpy as np
import ray
from ray import serve
from ray.serve import metrics

from rayembed import storage
from rayembed.cache import materialize
from rayembed.engine import OnnxEmbedder, matryoshka, plan_batches
from serve.batcher import Batcher
from rayembed.errors import InvalidRequest, ServeError
from serve.settings import ProviderSettings
from serve.tokens import ServingTokenizer


# Access logs off: one log line per request costs the 2-core box ~1 ms of CPU in every process it crosses.
@serve.deployment(max_ongoing_requests=256, ray_actor_options={"num_cpus": 1}, logging_config={"enable_access_log": False})
class EmbeddingReplica:
    def __init__(self, settings: dict):
        self.settings = ProviderSettings.model_validate(settings)
        s = self.settings
        model_dir = s.model_dir
        if storage.is_uri(model_dir) or s.model_sha256:  # one verified copy per node, however many replicas start
            model_dir = str(materialize(model_dir, s.model_sha256, log=print))
        self.engine = OnnxEmbedder(model_dir, device=s.device, precision=s.precision, threads=s.threads(),
                                   has_gpu=bool(ray.get_gpu_ids()), spin=s.spin)
        self.tokenizer = ServingTokenizer(model_dir, self.engine.manifest)
        self.dims = self.engine.manifest.dims
        if s.default_dimensions is not None and s.default_dimensions not in self.dims:
            raise ValueError(f"default_dimensions {s.default_dimensions} is not one of the model's sizes {self.dims}")
        self.call_tokens = s.call_tokens or self.engine.call_tokens()
        if s.max_batch_tokens < self.tokenizer.max_length:
            raise ValueError(f"max_batch_tokens ({s.max_batch_tokens}) must be >= the model's max_seq_length "
                             f"({self.tokenizer.max_length}) or a full-length input could never be batched")
        self.batcher = Batcher(self._run_batch, max_tokens=s.max_batch_tokens, max_items=s.max_batch_items,
                               wait_s=s.batch_wait_timeout_s, on_batch=self._observe_waits)
        tags = ("provider",)
        self._m_batch_texts = metrics.Histogram(
            "rayembed_batch_texts", "texts per ONNX Runtime call", boundaries=[1, 2, 4, 8, 16, 32, 64, 128], tag_keys=tags)
        self._m_batch_tokens = metrics.Histogram(
            "rayembed_batch_tokens", "padded tokens per ONNX Runtime call",
            boundaries=[16, 64, 256, 1024, 4096, 16384, 65536], tag_keys=tags)
        self._m_queue_ms = metrics.Histogram(
            "rayembed_queue_ms", "time a text waited before its ONNX Runtime call started",
            boundaries=[0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 5000], tag_keys=tags)
        self._m_tokens = metrics.Counter("rayembed_prompt_tokens", "tokens embedded", tag_keys=tags)
        for m in (self._m_batch_texts, self._m_batch_tokens, self._m_queue_ms, self._m_tokens):
            m.set_default_tags({"provider": s.name})
        self.batch_log: list[int] = []  # texts per ONNX Runtime call, newest last (bounded; read by info())

    def info(self) -> dict:
        """The served model and recent batch sizes; the gateway's readiness probe calls it."""
        m = self.engine.manifest
        return {
            "provider": self.settings.name,
            "embedding_dim": m.embedding_dim,
            "default_dimensions": self.settings.default_dimensions,
            "matryoshka_dims": self.dims,
            "max_seq_length": self.tokenizer.max_length,
            "prefixes": self.tokenizer.prefixes,
            "needs_input_type": self.tokenizer.needs_input_type and self.settings.default_input_type is None,
            "base_model": m.base_model,
            "onnx_file": self.engine.path.name,
            "providers": self.engine.providers,
            "threads": self.engine.threads,
            "call_tokens": self.call_tokens,
            "recent_batch_texts": list(self.batch_log[-256:]),
        }

    def check_health(self) -> None:
        self.engine.check()
        if not self.batcher.alive():
            raise RuntimeError("the batcher's thread has stopped")

    async def embed(self, texts: list[str], input_type: str | None = None, truncate: str = "NONE",
                    dimensions: int | None = None) -> tuple[np.ndarray, int] | ServeError:
        """Embeddings [len(texts), dimensions or H] (float32, normalized) and the prompt token count.

        A client error comes back as a value, not raised: raising would make Serve log a traceback
        for every bad request. The gateway raises it on its side.
        """
        try:
            return await self._embed(texts, input_type, truncate, dimensions)
        except ServeError as exc:
            return exc

    async def embed_many(self, requests: list[tuple]) -> list[tuple[np.ndarray, int] | ServeError]:
        """Several requests in one handle call, each `(texts, input_type, truncate, dimensions)` as for `embed`, each
        with its own result or client error: the gateway sends those that reach it together this way (one Ray task
        for the group instead of one per request). Their texts join the same batcher queue."""
        return list(await asyncio.gather(*(self.embed(*request) for request in requests)))

    async def _embed(self, texts: list[str], input_type: str | None, truncate: str,
                     dimensions: int | None) -> tuple[np.ndarray, int]:
        input_type = input_type or self.settings.default_input_type
        if input_type is None and self.tokenizer.needs_input_type:
            raise InvalidRequest("input_type is required for this model: 'query' for search queries, 'passage' "
                                 "for documents (it selects the prefix the model was trained with)", "input_type")
        if dimensions is None:
            dimensions = self.settings.default_dimensions
        if dimensions is not None and dimensions not in self.dims:
            raise InvalidRequest(f"dimensions must be one of {self.dims} for this model, not {dimensions}", "dimensions")
        ids = self.tokenizer.encode(texts, input_type, truncate)
        out = np.stack(await self.batcher.embed(ids))  # [N, H]
        n_tokens = sum(len(x) for x in ids)
        self._m_tokens.inc(n_tokens)
        return matryoshka(out, dimensions), n_tokens

    def _observe_waits(self, waits_s: list[float]) -> None:
        for wait in waits_s:
            self._m_queue_ms.observe(wait * 1000)

    def _run_batch(self, ids: list[list[int]]) -> np.ndarray:
        """One batch's embeddings [N, H], in order: its least-cost length-sorted calls. Runs in the batcher's thread
        (ONNX Runtime releases the GIL meanwhile)."""
        s = self.settings
        out = np.empty((len(ids), self.engine.manifest.embedding_dim), np.float32)  # [N, H]
        for plan in plan_batches([len(x) for x in ids], s.max_batch_texts, s.max_batch_tokens, self.call_tokens):
            input_ids, mask = self.tokenizer.pad([ids[i] for i in plan])  # [b, S]
            out[plan] = self.engine.run(input_ids, mask)  # [b, H]
            self._m_batch_texts.observe(len(plan))
            self._m_batch_tokens.observe(int(input_ids.size))
            self.batch_log.append(len(plan))
        if len(self.batch_log) > 4096:
            del self.batch_log[:-256]
        return out
