"""Serving pieces without Ray: batch plans, Matryoshka, the status table, request parsing, routing, config."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from pydantic import ValidationError

from rayembed.engine import matryoshka, plan_batches
from rayembed.errors import (InputTooLong, InvalidRequest, NotFound, PayloadTooLarge, QueueFull, Unavailable, envelope,
                          status_of)
from serve.routing import RoutingTable
from serve.schemas import parse_request, render
from serve.settings import ConfigError, GatewayConfig, Limits, load_gateway_config


def test_plan_batches_sorts_by_length_and_respects_both_bounds():
    lengths = [50, 3, 48, 4, 5, 49, 2, 51]
    plans = plan_batches(lengths, max_texts=3, max_tokens=120, call_tokens=40)
    assert sorted(i for p in plans for i in p) == list(range(8))
    for plan in plans:
        assert len(plan) <= 3
        assert len(plan) * max(lengths[i] for i in plan) <= 120
    # short texts travel together, long ones together: padding stays small
    assert [sorted(lengths[i] for i in p) for p in plans] == [[2, 3], [4, 5], [48, 49], [50, 51]]


def test_plan_batches_gives_an_oversized_text_its_own_run():
    assert plan_batches([10, 500, 10], max_texts=8, max_tokens=100) == [[0, 2], [1]]


def _plan_cost(plans, lengths, call_tokens):
    return sum(call_tokens + len(p) * max(lengths[i] for i in p) for p in plans)


def test_plan_batches_weighs_padding_against_the_cost_of_a_call():
    lengths = [12, 50, 11, 48, 10, 52, 13, 49]  # two clusters
    one_call = plan_batches(lengths, max_texts=32, max_tokens=8192, call_tokens=10_000)
    assert len(one_call) == 1  # a call dearer than any padding: everything in one
    split = plan_batches(lengths, max_texts=32, max_tokens=8192, call_tokens=20)
    assert [sorted(lengths[i] for i in p) for p in split] == [[10, 11, 12, 13], [48, 49, 50, 52]]
    # 2 calls x 20 + 4 x 13 + 4 x 52 = 300 against 20 + 8 x 52 = 436 for one call
    assert _plan_cost(split, lengths, 20) == 300 < _plan_cost(one_call, lengths, 20) == 436


def test_plan_batches_is_the_least_cost_cut_of_the_sorted_lengths():
    import itertools
    import random

    rng = random.Random(7)
    for _ in range(200):
        n, max_texts, call = rng.randint(1, 9), rng.randint(1, 5), rng.randint(1, 60)
        lengths = [rng.randint(1, 80) for _ in range(n)]
        max_tokens = rng.randint(80, 300)
        plans = plan_batches(lengths, max_texts, max_tokens, call)
        assert sorted(i for p in plans for i in p) == list(range(n))
        assert all(len(p) <= max_texts and (len(p) == 1 or len(p) * max(lengths[i] for i in p) <= max_tokens)
                   for p in plans)
        width = sorted(lengths)
        best = float("inf")  # every cut of the sorted list into runs, by brute force
        for cuts in itertools.product([False, True], repeat=n - 1):
            runs, start = [], 0
            for k, c in enumerate(cuts, 1):
                if c:
                    runs.append(width[start:k])
                    start = k
            runs.append(width[start:])
            if all(len(r) <= max_texts and (len(r) == 1 or len(r) * r[-1] <= max_tokens) for r in runs):
                best = min(best, sum(call + len(r) * r[-1] for r in runs))
        assert _plan_cost(plans, lengths, call) == best, (lengths, max_texts, max_tokens, call)


def test_matryoshka_slices_then_renormalizes():
    emb = np.array([[3.0, 4.0, 12.0], [1.0, 0.0, 0.0]], dtype=np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    cut = matryoshka(emb, 2)
    np.testing.assert_allclose(cut, [[0.6, 0.8], [1.0, 0.0]], atol=1e-6)
    assert matryoshka(emb, None) is emb and matryoshka(emb, 3) is emb


@pytest.mark.parametrize("exc,status,kind", [
    (InvalidRequest("x"), 400, "invalid_request_error"), (InputTooLong("x"), 400, "invalid_request_error"),
    (NotFound("x"), 404, "not_found_error"), (PayloadTooLarge("x"), 413, "invalid_request_error"),
    (QueueFull("x"), 429, "rate_limit_error"), (Unavailable("x"), 503, "service_unavailable_error"),
    (KeyError("secret"), 500, "internal_server_error")])
def test_one_status_table(exc, status, kind):
    assert status_of(exc)[:2] == (status, kind)


def test_envelope_shape():
    assert envelope("m", "t", "p", "c") == {"error": {"message": "m", "type": "t", "param": "p", "code": "c"}}


def test_parse_request_normalizes_and_names_fields():
    req = parse_request(b'{"model": "m", "input": "hi", "truncate": "end", "input_type": "Query", "extra": 1}')
    assert (req.truncate, req.input_type, req.encoding_format) == ("END", "query", "float")
    with pytest.raises(InvalidRequest, match="dimensions") as err:
        parse_request(b'{"input": "hi", "dimensions": "big"}')
    assert err.value.param == "dimensions"
    with pytest.raises(InvalidRequest, match="must be a JSON object"):
        parse_request(b'["hi"]')


def test_request_limits():
    limits = Limits(max_inputs_per_request=2, max_chars_per_input=5)
    assert parse_request(b'{"input": ["ab", "cd"]}').texts(limits) == ["ab", "cd"]
    with pytest.raises(PayloadTooLarge, match="3 inputs"):
        parse_request(b'{"input": ["a", "b", "c"]}').texts(limits)
    with pytest.raises(PayloadTooLarge, match="input\\[0\\] has 6 characters"):
        parse_request(b'{"input": "abcdef"}').texts(limits)


def test_render_float_and_base64():
    emb = np.array([[0.5, -0.25]], dtype=np.float32)
    import base64
    import json

    body = json.loads(render(emb, "float", "m", 7))
    assert body["data"] == [{"object": "embedding", "index": 0, "embedding": [0.5, -0.25]}]
    assert body["usage"] == {"prompt_tokens": 7, "total_tokens": 7} and body["model"] == "m"
    b64 = json.loads(render(emb, "base64", "m", 7))["data"][0]["embedding"]
    assert np.frombuffer(base64.b64decode(b64), "<f4").tolist() == [0.5, -0.25]


def _table(**extra) -> RoutingTable:
    cfg = GatewayConfig.model_validate({"models": [
        {"name": "a", "providers": [{"name": "a1", "app": "x"}, {"name": "a2", "app": "y"}]},
        {"workspace": "team", "name": "b", "providers": [{"name": "b1", "app": "z"}]}]})
    return RoutingTable(cfg)


def test_routing_table_resolution():
    t = _table()
    assert [t.entity("default", "a")[1].name for _ in range(3)] == ["a1", "a2", "a1"]  # providers take turns
    assert t.openai("team/b")[1].name == "b1" and t.openai("default/a")[0].name == "a"
    assert t.provider("team", "b1")[0].name == "b"
    with pytest.raises(NotFound, match="provider 'b1' does not exist in workspace 'default'"):
        t.provider("default", "b1")
    with pytest.raises(NotFound, match="model 'b' does not exist"):
        t.openai("b")  # bare names live in the default workspace
    with pytest.raises(InvalidRequest, match="model is required: one of a, team/b"):
        t.openai(None)
    assert t.model_ids() == ["a", "team/b"]


def test_gateway_config_reports_every_problem(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_gateway_config({"models": [
            {"name": "a", "providers": [{"name": "p", "model_dir": str(tmp_path)}]},
            {"name": "b", "providers": [{"name": "q", "model_dir": "/x", "app": "y"},
                                        {"name": "s", "app": "y", "autoscaling": {"min_replicas": 3, "max_replicas": 1}}]},
            {"name": "c", "providers": [{"name": "r", "app": "y", "replicas": 2}]}]})
    text = str(err.value)
    assert "models.0.providers.0: model_dir" in text and "lacks model.onnx, tokenizer.json, manifest.json" in text
    assert "give exactly one of model_dir" in text and "min_replicas (3) > max_replicas (1)" in text
    assert "models.2.providers.0.replicas: unknown key" in text
    with pytest.raises(ConfigError, match="provider p appears twice"):
        load_gateway_config({"models": [{"name": "a", "providers": [{"name": "p", "app": "x"}]},
                                        {"name": "b", "providers": [{"name": "p", "app": "y"}]}]})


def test_config_yaml_files_in_the_repo_parse():
    import yaml

    from tests.conftest import ROOT

    serve_cfg = yaml.safe_load((ROOT / "serve" / "config.yaml").read_text())
    args = serve_cfg["applications"][0]["args"]
    assert serve_cfg["applications"][0]["import_path"] == "serve.app:build_app"
    GatewayConfig.model_validate(args, context={"check_files": False})
    GatewayConfig.model_validate(yaml.safe_load((ROOT / "examples" / "gateway.yaml").read_text()),
                                 context={"check_files": False})


def test_provider_deployment_options(tmp_path):
    from serve.settings import REPLICA_SERVE_ENV, ProviderSettings

    fixed = ProviderSettings(name="p", app="x", num_replicas=3, num_cpus=2, max_queued_requests=7).deployment_options()
    assert fixed["num_replicas"] == 3 and "autoscaling_config" not in fixed
    assert fixed["ray_actor_options"] == {"num_cpus": 2, "num_gpus": 0, "runtime_env": {"env_vars": REPLICA_SERVE_ENV}}
    assert REPLICA_SERVE_ENV == {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0"}  # its code never blocks its loop
    assert fixed["max_queued_requests"] == 7
    auto = ProviderSettings(name="p", app="x", autoscaling={"min_replicas": 1, "max_replicas": 4,
                                                             "target_ongoing_requests": 8}).deployment_options()
    assert auto["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 8}
    assert "num_replicas" not in auto
    assert ProviderSettings(name="p", app="x", num_cpus=2).threads() == 2
    assert ProviderSettings(name="p", app="x", num_cpus=0.5).threads() == 1


def test_cuda_request_without_cuda_fails_loudly(minilm_onnx):
    import onnxruntime as ort

    from rayembed.engine import CUDA, OnnxEmbedder

    if CUDA not in ort.get_available_providers():  # the CPU build (this repo's `cpu` extra)
        with pytest.raises(RuntimeError, match="install the `gpu` extra"):
            OnnxEmbedder(minilm_onnx, device="cuda")
    engine = OnnxEmbedder(minilm_onnx, device="auto", has_gpu=False)
    assert engine.providers == ["CPUExecutionProvider"]
    engine.want_cuda = True  # what the health check sees when a session silently fell back to the CPU
    with pytest.raises(RuntimeError, match="CUDA was asked for but the session runs on"):
        engine.check()


def test_python_m_serve_picks_a_gpu_replica_where_ray_has_a_gpu_and_onnxruntime_has_cuda():
    from serve.__main__ import describe, replica_resources

    # no GPU: the machine's cores, shared by the replicas (ONNX Runtime threads)
    assert replica_resources(cores=2, replicas=1, gpus=0, cuda=False) == (2.0, 0.0, None)
    assert replica_resources(cores=8, replicas=3, gpus=0, cuda=True) == (2.0, 0.0, None)
    assert replica_resources(cores=1, replicas=2, gpus=0, cuda=False) == (1.0, 0.0, None)
    # a free GPU and the CUDA provider: one GPU and one CPU per replica; more replicas than GPUs share them evenly,
    # and a fraction always fits on one GPU (1.5 free counts as one whole GPU)
    assert replica_resources(cores=16, replicas=1, gpus=1, cuda=True) == (1.0, 1.0, None)
    assert replica_resources(cores=16, replicas=2, gpus=4, cuda=True) == (1.0, 1.0, None)
    assert replica_resources(cores=16, replicas=3, gpus=1, cuda=True) == (1.0, pytest.approx(1 / 3), None)
    assert replica_resources(cores=16, replicas=3, gpus=2, cuda=True) == (1.0, 0.5, None)
    assert replica_resources(cores=16, replicas=2, gpus=1.5, cuda=True) == (1.0, 0.5, None)
    assert replica_resources(cores=16, replicas=1, gpus=0.5, cuda=True) == (16.0, 0.0, None)  # no whole GPU free
    # a GPU but the CPU build of onnxruntime: CPU, and a note saying how to use the GPU
    cpus, gpus, note = replica_resources(cores=16, replicas=1, gpus=1, cuda=False)
    assert (cpus, gpus) == (16.0, 0.0) and "onnxruntime-gpu" in note and "--num-gpus 0" in note
    # the int8 graph is the CPU one: it stays on the CPU unless GPUs are given
    cpus, gpus, note = replica_resources(cores=16, replicas=1, gpus=1, cuda=True, precision="int8")
    assert (cpus, gpus) == (16.0, 0.0) and "int8" in note
    assert replica_resources(cores=16, replicas=1, gpus=1, cuda=True, num_gpus=1, precision="int8") == (1.0, 1.0, None)
    assert replica_resources(cores=16, replicas=1, gpus=0, cuda=True, precision="int8") == (16.0, 0.0, None)
    # what the user gave wins, each on its own
    assert replica_resources(cores=16, replicas=1, gpus=1, cuda=True, num_gpus=0) == (16.0, 0.0, None)
    assert replica_resources(cores=16, replicas=1, gpus=1, cuda=True, num_cpus=4) == (4.0, 1.0, None)
    assert replica_resources(cores=16, replicas=1, gpus=0, cuda=False, num_cpus=0.5, num_gpus=1) == (0.5, 1.0, None)
    from serve.settings import ProviderSettings

    assert "CUDA" in describe(ProviderSettings(name="p", app="x", num_cpus=1, num_gpus=1))
    assert "2 x 2 CPU, ONNX Runtime on CPU with 2 thread(s)" in describe(ProviderSettings(name="p", app="x", num_cpus=2,
                                                                                          num_replicas=2))


def test_gateway_replicas_reach_the_gateway_deployment():
    from serve.app import gateway_app

    table = {"models": [{"name": "m", "providers": [{"name": "p", "app": "x"}]}]}
    assert gateway_app(GatewayConfig.model_validate(table))._bound_deployment.num_replicas == 1
    assert gateway_app(GatewayConfig.model_validate({**table, "gateway_replicas": 2}))._bound_deployment.num_replicas == 2
    with pytest.raises(ValidationError, match="gateway_replicas"):
        GatewayConfig.model_validate({**table, "gateway_replicas": 0})


def test_standalone_apps_give_each_model_its_own_application_on_its_provider_route(minilm_onnx):
    """`python -m serve`'s layout: a provider with a model_dir becomes its own application at its provider route, and
    the gateway reaches it through `app:`; a provider that already is an application is left as it is."""
    from serve.direct import ProviderIngress, standalone_apps

    config = GatewayConfig.model_validate({"limits": {"max_inputs_per_request": 7}, "models": [
        {"name": "m", "providers": [{"name": "p", "model_dir": str(minilm_onnx), "num_cpus": 2}]},
        {"workspace": "lab", "name": "e", "providers": [{"name": "ext", "app": "running-app"}]}]})
    (name, provider_app, prefix), (gw_name, gw_app, gw_prefix) = standalone_apps(config, "gw")
    assert (name, prefix) == ("gw.default.p", "/v2/workspaces/default/inference/gateway/provider/p/-")
    assert (gw_name, gw_prefix) == ("gw", "/")
    bound = provider_app._bound_deployment
    assert bound.func_or_class.__name__ == ProviderIngress.func_or_class.__name__ and bound.name == "replica-p"
    assert bound.ray_actor_options["num_cpus"] == 2
    settings, listing, limits, auth, workspace = bound.init_args
    assert settings["name"] == "p" and limits["max_inputs_per_request"] == 7
    assert auth == config.auth.model_dump() and workspace == "default"  # its route checks the gateway's keys
    assert listing == {"id": "m", "object": "model", "created": 0, "owned_by": "default", "providers": ["p"]}
    table = GatewayConfig.model_validate(gw_app._bound_deployment.init_args[0], context={"check_files": False})
    assert [(p.name, p.app, p.model_dir) for m in table.models for p in m.providers] == [
        ("p", "gw.default.p", None), ("ext", "running-app", None)]
    assert gw_app._bound_deployment.init_args[1] == {}  # no deployment bound inside the gateway's application


def test_gateway_processes_run_user_code_on_the_replica_loop_unless_overridden():
    from serve.app import GATEWAY_SERVE_ENV, gateway_actor_options

    models = [{"name": "m", "providers": [{"name": "p", "app": "p-app"}]}]
    default = gateway_actor_options(GatewayConfig.model_validate({"models": models}))
    assert default == {"num_cpus": 0, "runtime_env": {"env_vars": GATEWAY_SERVE_ENV}}
    assert GATEWAY_SERVE_ENV == {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0", "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0"}
    extra = gateway_actor_options(GatewayConfig.model_validate(
        {"models": models, "gateway_env": {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "", "X": "1"}}))
    assert extra["runtime_env"]["env_vars"] == {"RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0", "X": "1"}
    restored = gateway_actor_options(GatewayConfig.model_validate(
        {"models": models, "gateway_env": {k: "" for k in GATEWAY_SERVE_ENV}}))
    assert restored == {"num_cpus": 0}


@pytest.mark.parametrize("overhead_s,per_token_s,want", [(0.01, 0.0005, 20), (0.06, 0.001, 60)])
def test_call_tokens_is_a_calls_fixed_cost_over_its_per_token_cost(overhead_s, per_token_s, want):
    """The arithmetic of the timing, on a session whose calls take overhead + tokens x per_token (slept); the second
    case is a slow model (over 50 ms a call), timed with fewer and smaller calls."""
    import time

    from rayembed.engine import OnnxEmbedder

    engine = object.__new__(OnnxEmbedder)
    calls = []

    def run(ids, mask):
        calls.append(ids.shape)
        time.sleep(overhead_s + per_token_s * ids.size)

    engine.run = run
    assert abs(engine.call_tokens() - want) <= want * 0.15
    assert max(b for b, _ in calls) == (16 if overhead_s < 0.05 else 4)


class _GroupHandle:
    """Stands in for a provider's DeploymentHandle: records each `embed_many` call's requests and answers them with
    `answer(requests)` (a list of results, or an exception to raise), after yielding to the event loop once."""

    def __init__(self, answer):
        self.calls, self.answer = [], answer

    @property
    def embed_many(self):
        return self

    def remote(self, requests):
        self.calls.append(list(requests))

        async def reply():
            await asyncio.sleep(0)
            result = self.answer(requests)
            if isinstance(result, BaseException):
                raise result
            return result
        return reply()


def _core(answer) -> tuple:
    from serve.gateway import GatewayCore

    config = GatewayConfig.model_validate({"models": [{"name": "m", "providers": [{"name": "p", "app": "p-app"}]}]})
    handle = _GroupHandle(answer)
    core = GatewayCore(config, {"p-app": handle})
    return core, config.models[0].providers[0], handle


def test_the_gateway_sends_requests_that_reach_it_together_in_one_handle_call():
    """Requests for one provider that reach the gateway in the same pass of its event loop go in one `embed_many`
    call, each with its own answer (a client error stays that request's); a request after them goes on its own; a
    request cancelled before the call is left out of it."""
    async def main():
        core, provider, handle = _core(lambda reqs: [InvalidRequest("bad", "dimensions") if r[3] == 7
                                                     else (np.full((len(r[0]), 2), i, np.float32), len(r[0]))
                                                     for i, r in enumerate(reqs)])
        requests = [([f"t{i}"] * (i + 1), None, "NONE", 7 if i == 2 else None) for i in range(5)]
        results = await asyncio.gather(*(core._submit(provider, r) for r in requests))
        assert handle.calls == [requests]
        for i, result in enumerate(results):
            if i == 2:
                assert isinstance(result, InvalidRequest) and result.param == "dimensions"
            else:
                assert result[1] == i + 1 and result[0].shape == (i + 1, 2) and (result[0] == i).all()
        assert (await core._submit(provider, requests[0]))[1] == 1 and handle.calls[1] == [requests[0]]
        gone = asyncio.ensure_future(core._submit(provider, requests[1]))
        kept = asyncio.ensure_future(core._submit(provider, requests[3]))
        await asyncio.sleep(0)  # both are queued for the next call
        gone.cancel()
        assert (await kept)[1] == 4 and handle.calls[2] == [requests[3]] and gone.cancelled()
        assert core._pending == {} and core._sending == set()

    asyncio.run(main())


def test_a_failed_group_call_answers_every_request_in_it():
    from ray.exceptions import ActorUnavailableError
    from ray.serve.exceptions import BackPressureError

    async def main():
        core, provider, handle = _core(lambda reqs: BackPressureError(num_queued_requests=9, max_queued_requests=8))
        out = await asyncio.gather(*(core._submit(provider, ([f"t{i}"], None, "NONE", None)) for i in range(3)),
                                   return_exceptions=True)
        assert len(handle.calls) == 1 and all(isinstance(e, BackPressureError) for e in out)
        # a replica that died mid-call: the group is sent again, and answered
        failures = iter([ActorUnavailableError("gone", None)])
        core, provider, handle = _core(lambda reqs: next(failures, None) or [(np.zeros((1, 2)), 1)] * len(reqs))
        out = await asyncio.gather(*(core._submit(provider, ([f"t{i}"], None, "NONE", None)) for i in range(2)))
        assert [len(c) for c in handle.calls] == [2, 2] and [r[1] for r in out] == [1, 1]

    asyncio.run(main())
