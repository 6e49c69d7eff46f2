"""The tree's contracts: train/ and serve/ are siblings over rayembed/, serving imports no torch,
the artifact manifest is versioned, the CLIs document their fields, benchmark commands run as written."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys

import pytest

from rayembed.artifact import ArtifactError, read_manifest
from tests.conftest import ROOT

PACKAGES = ("rayembed", "cluster", "train", "tune", "serve", "batch")


def imports_of(package: str) -> list[tuple[str, str, list[str]]]:
    """(file, imported module, imported names) for every import in a package."""
    out = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                out.extend((path.name, a.name, []) for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                out.append((path.name, node.module, [a.name for a in node.names]))
    return out


@pytest.mark.parametrize("package,forbidden", [
    ("serve", {"train", "tune", "cluster", "torch", "transformers", "peft"}),
    ("train", {"serve", "tune", "cluster"}),
    ("tune", {"serve", "cluster"}),
    ("rayembed", {"train", "tune", "serve", "cluster", "torch", "ray"}),
    ("batch", {"train", "tune", "serve", "cluster", "torch", "transformers", "peft"}),
])
def test_layering(package, forbidden):
    """Layers point down: no engine imports the control plane, and the helpers every package uses (errors, connecting
    to Ray) live in rayembed/, whose only Ray import is rayembed.runtime's, the one `ray.init`."""
    bad = [(f, m) for f, m, _ in imports_of(package) if m.split(".")[0] in forbidden
           and not (package == "rayembed" and f == "runtime.py" and m == "ray")]
    assert bad == [], f"{package}/ must not import {sorted(forbidden)}: {bad}"


def test_no_module_imports_another_packages_private_names():
    bad = [(pkg, f, m, n) for pkg in PACKAGES for f, m, names in imports_of(pkg)
           if m.split(".")[0] in PACKAGES and m.split(".")[0] != pkg for n in names if n.startswith("_")]
    assert bad == []


def test_serving_modules_import_without_torch():
    code = ("import sys\nfor m in ('torch', 'transformers', 'peft'): sys.modules[m] = None\n"
            "import serve.app, serve.gateway, serve.__main__, rayembed.artifact, rayembed.config\nprint('ok')")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_manifest_of_a_newer_format_is_refused(minilm_onnx, tmp_path):
    data = json.loads((minilm_onnx / "manifest.json").read_text())
    assert read_manifest(minilm_onnx).format_version == 1
    (tmp_path / "manifest.json").write_text(json.dumps({**data, "format_version": 2, "new_field": {"x": 1}}))
    with pytest.raises(ArtifactError, match=r"format_version 2 is newer than this rayembed reads \(1\): upgrade rayembed"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({**data, "unknown_but_same_version": True}))
    assert read_manifest(tmp_path).embedding_dim == 384
    with pytest.raises(ArtifactError, match="has no manifest.json"):
        read_manifest(tmp_path / "nowhere")


@pytest.mark.parametrize("module,fields", [
    ("train", ["optimizer.learning_rate (default 5e-06): Peak AdamW learning rate.",
               "training.lora.rank (default 16): LoRA rank r.", "dataset.training (required)"]),
    ("tune", ["search.learning_rates", "job.optimizer.weight_decay", "output.dir (required)"]),
])
def test_cli_help_lists_every_field_with_its_description(module, fields):
    proc = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for field in fields:
        assert field in proc.stdout


def documented_bench_commands() -> list[str]:
    texts = [(ROOT / "README.md").read_text(), (ROOT / "docs" / "benchmarks.md").read_text()]
    texts += [p.read_text() for p in (ROOT / "bench").glob("*.py")]
    return sorted({m for t in texts for m in re.findall(r"python (?:-m bench\.\w+|bench/\w+\.py)", t)})


def test_every_documented_benchmark_command_starts():
    commands = documented_bench_commands()
    assert {"python -m bench.gpu_train", "python -m bench.serving"} <= set(commands)
    for command in commands:
        args = command.split()[1:]
        proc = subprocess.run([sys.executable, *args, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0 and "usage:" in proc.stdout, f"{command}: {proc.stderr[-1500:]}"
    # the script form works too: no bench file shadows a package of ours or of the standard library
    shadowing = {p.stem for p in (ROOT / "bench").glob("*.py")} & (set(sys.stdlib_module_names) | set(PACKAGES))
    assert shadowing == set()
    for script in sorted((ROOT / "bench").glob("[!_]*.py")):
        proc = subprocess.run([sys.executable, str(script.relative_to(ROOT)), "--help"], cwd=ROOT, capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 0, f"{script.name}: {proc.stderr[-1500:]}"


def test_no_pickle_loads_and_no_remote_code():
    """Weights are safetensors, optimizer state loads with weights_only, nothing unpickles or runs Hub code."""
    problems = []
    for package in (*PACKAGES, "bench"):
        for path in (ROOT / package).rglob("*.py"):
            for n, line in enumerate(path.read_text().splitlines(), 1):
                code = line.split("#")[0]
                if (re.search(r"\bpickle\.loads?\(|\bcloudpickle\.loads?\(|\bjoblib\.load\(|trust_remote_code\s*=\s*True"
                              r"|use_safetensors\s*=\s*False|allow_pickle\s*=\s*True", code)
                        or ("torch.load(" in code and "weights_only=True" not in code)):
                    problems.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not problems, problems


def test_the_readme_job_config_example_is_a_valid_config():
    """The README's annotated job config is what people copy: it must pass the job's own validation."""
    import yaml

    from train.config import validate_config

    text = (ROOT / "README.md").read_text()
    start = text.index("\nmodel: ") + 1
    block = text[start:text.index("```", start)]
    cfg = validate_config(yaml.safe_load(block))
    assert cfg.dataset.mining is not None and cfg.loss.matryoshka_dims == [384, 768, 2048]


def test_every_text_field_of_a_job_config_is_a_place_or_plain_text():
    """A tenant's job may set no place (cluster/tenancy.py finds them by their `place` mark). A new `str` field of a
    job or sweep config must be marked as a place (read, write, model) or listed here as text that names nothing."""
    import typing

    from pydantic import BaseModel

    from rayembed.config import place_fields
    from tune.config import SweepConfig

    plain = {"job.name", "job.prefixes.query", "job.prefixes.passage", "job.training.lora.target_modules",
             "job.resources.worker_resources"}

    def texts(cls, prefix=""):
        for name, field in cls.model_fields.items():
            args = set(typing.get_args(field.annotation)) | {field.annotation}
            nested = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
            if nested:
                yield from texts(nested[0], f"{prefix}{name}.")
            elif str in args or any(str in typing.get_args(a) for a in args):
                yield prefix + name

    places = place_fields(SweepConfig)
    unmarked = sorted(set(texts(SweepConfig)) - set(places) - plain)
    assert unmarked == [], f"mark these as places (json_schema_extra={{'place': ...}}) or list them as plain: {unmarked}"
    assert places["job.output.storage_path"] == "write" and places["job.dataset.mining.corpus"] == "read"


IO_ROOTS = ("storage", "store", "ray", "serve", "requests", "httpx", "urllib", "socket", "subprocess")


def _dotted(node: ast.AST) -> str:
    """`self.ctx.store.put` for the callee of a call (what can be named; '' for anything else)."""
    if isinstance(node, ast.Attribute):
        inner = _dotted(node.value)
        return f"{inner}.{node.attr}" if inner else node.attr
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Call):
        return _dotted(node.func)
    return ""


def io_under_locks(source: str) -> list[str]:
    """Calls made inside a `with ...lock...:` block that may do I/O: anything reached through storage, a store, the
    services' Context (every one of its helpers reads or writes the store), Ray, Serve, HTTP or a subprocess."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, (ast.With, ast.AsyncWith)):
            continue
        if not any("lock" in _dotted(item.context_expr).lower() for item in node.items):
            continue
        for inner in (n for stmt in node.body for n in ast.walk(stmt)):
            if isinstance(inner, ast.Call):
                parts = _dotted(inner.func).split(".")
                if any(p in IO_ROOTS or p in ("ctx", "_client", "remote") for p in parts):
                    found.append(f"line {inner.lineno}: {'.'.join(parts)}")
    return found


def test_no_io_is_done_under_a_lock_in_the_control_plane():
    """The services hold no lock (each write is a compare-and-set); what locks remain (the reconciler's task set)
    guard memory only. cluster/store.py is exempt: the SQLite store serializes its one connection itself."""
    assert io_under_locks("with self._lock:\n    self.store.put('a', '', 'b', {})\n    x = {1}\n")  # the check bites
    assert io_under_locks("with self._tasks_lock:\n    self.ctx.load('job', 'w', 'n', M)\n")
    assert not io_under_locks("with self._tasks_lock:\n    self._running.add(key)\n")
    bad = {str(p.relative_to(ROOT)): found for p in sorted((ROOT / "cluster").rglob("*.py")) if p.name != "store.py"
           if (found := io_under_locks(p.read_text()))}
    assert bad == {}


def test_ray_init_lives_in_one_function():
    """`rayembed.runtime.init_ray` is the only caller of `ray.init` in the shipped packages and the benchmarks."""
    calls = [f"{p.relative_to(ROOT)}:{n.lineno}" for pkg in (*PACKAGES, "bench") for p in sorted((ROOT / pkg).rglob("*.py"))
             for n in ast.walk(ast.parse(p.read_text())) if isinstance(n, ast.Call) and _dotted(n.func) == "ray.init"]
    assert calls == ["rayembed/runtime.py:" + str(next(
        n.lineno for n in ast.walk(ast.parse((ROOT / "rayembed/runtime.py").read_text()))
        if isinstance(n, ast.Call) and _dotted(n.func) == "ray.init"))]


def test_benchmarks_import_nothing_from_the_tests():
    bad = [(f, m) for f, m, _ in imports_of("bench") if m.split(".")[0] == "tests"]
    assert bad == []


def test_every_control_plane_call_is_routed_to_one_service():
    """Each public method of a service is a route of the ControlPlane (ROUTES) or used by another service; every name
    the API ingress, the upload ingress and the CLI call through Ray exists on the actor."""
    from cluster import controlplane
    from cluster.services.base import Service

    services = {"workspaces": controlplane.WorkspaceService, "datasets": controlplane.DatasetService,
                "models": controlplane.ModelService, "jobs": controlplane.JobService,
                "deployments": controlplane.DeploymentService}
    internal = {"reconcile", "resolve_spec", "entity_from_artifact", "verify"}  # called by the reconciler or a service
    routed = [m for methods in controlplane.ROUTES.values() for m in methods]
    assert len(routed) == len(set(routed))
    for name, cls in services.items():
        public = {m for m in vars(cls) if not m.startswith("_") and callable(getattr(cls, m))} - internal
        assert public == set(controlplane.ROUTES[name]), name
        assert issubclass(cls, Service)
    called = set()
    for path in ("cluster/api.py", "cluster/upload_ingress.py", "cluster/cli.py", "cluster/local.py"):
        text = (ROOT / path).read_text()
        called |= set(re.findall(r'(?:_call|call_plane|_control_plane_call\(\))\(\s*"([a-z_]+)"', text))
        called |= set(re.findall(r'\("(?:GET|POST|PUT|PATCH|DELETE)", [^,]+, "([a-z_]+)"', text))  # the API's routes
        called |= set(re.findall(r"\.([a-z_]+)\.remote\(", text))
    missing = sorted(c for c in called if c not in ("embed", "info") and not hasattr(controlplane.ControlPlane, c))
    assert len(called) > 30 and missing == [], missing


RATE = re.compile(r"per_s|_rps|rate|_over_|throughput|speedup", re.I)


def weak_asserts(source: str) -> list[str]:
    """Asserts that accept nearly any outcome: a rate checked only against `> 0` (or `>= 0`), and a verdict compared
    with another copy of a verdict (taken from the same data, it cannot disagree)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Assert):
            continue
        for cmp in (n for n in ast.walk(node.test) if isinstance(n, ast.Compare)):
            text = ast.unparse(cmp)
            if (len(cmp.ops) == 1 and isinstance(cmp.ops[0], (ast.Gt, ast.GtE)) and isinstance(cmp.comparators[0], ast.Constant)
                    and cmp.comparators[0].value == 0 and RATE.search(ast.unparse(cmp.left))):
                found.append(f"line {node.lineno}: {text}")
            sides = [cmp.left, *cmp.comparators]
            if len(cmp.ops) == 1 and isinstance(cmp.ops[0], ast.Eq) and all(
                    not isinstance(s, (ast.Constant, ast.Name)) and "verdict" in ast.unparse(s) for s in sides):
                found.append(f"line {node.lineno}: {text}")
    return found


def test_no_test_accepts_any_rate_or_any_verdict():
    assert weak_asserts("assert r['texts_per_s'] > 0") and weak_asserts("assert a.verdict == b['verdict']['outcome']")
    assert not weak_asserts("assert r['a_over_b'] == pytest.approx(x / y)") and not weak_asserts("assert v['verdict'] == 'worse'")
    assert not weak_asserts("assert result['saturation_rps'] > result['rate_rps'] > 0")
    bad = {p.name: found for p in sorted((ROOT / "tests").glob("test_*.py")) if (found := weak_asserts(p.read_text()))}
    assert bad == {}


def test_every_import_of_the_trees_own_names_resolves():
    """Every module of the tree imports, and every `from <our package> import name`, at module level or inside a
    function, names something that exists: an import inside a function runs only when that path runs, so a rename
    could leave one behind that no test reaches."""
    code = ("import ast, importlib, pathlib, sys\nroot = pathlib.Path(sys.argv[1])\nbad = []\n"
            "for pkg in sys.argv[2:]:\n    for p in sorted((root / pkg).rglob('*.py')):\n"
            "        if p.name != '__main__.py' and pkg not in ('tests', 'examples'):\n"
            "            try:\n                importlib.import_module('.'.join(p.relative_to(root).with_suffix('').parts))\n"
            "            except Exception as exc:\n                bad.append(f'{p.relative_to(root)}: {type(exc).__name__}: {exc}')\n"
            "        for n in ast.walk(ast.parse(p.read_text())):\n"
            "            if isinstance(n, ast.ImportFrom) and n.module and n.level == 0 and n.module.split('.')[0] in sys.argv[2:]:\n"
            "                m = importlib.import_module(n.module)\n"
            "                for a in n.names:\n"
            "                    if not hasattr(m, a.name):\n"
            "                        try:\n                            importlib.import_module(n.module + '.' + a.name)\n"
            "                        except ImportError:\n                            bad.append(f'{p.relative_to(root)}:{n.lineno}: {n.module}.{a.name}')\n"
            "print(bad)")
    proc = subprocess.run([sys.executable, "-c", code, str(ROOT), *PACKAGES, "bench", "tests", "examples"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.stdout.strip().splitlines()[-1:] == ["[]"], proc.stdout[-3000:] + proc.stderr[-3000:]
