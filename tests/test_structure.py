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
