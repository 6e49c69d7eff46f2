"""Tiny offline checkpoints laid out like the real ones: a nemotron-style bidirectional Llama and a BERT."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "a library for parsing json documents in python",
    "command line tool to compress files with zstandard",
    "daemon that monitors disks and reports failures by email",
    "query: passage: what how which tool for the of and a to in",
    "perl module python ruby rust go web server client database backup",
]


def _word_tokenizer(special: list[str], template: str | None, corpus: list[str] | None = None) -> Tokenizer:
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]") if "[UNK]" in special else models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = (trainers.WordPieceTrainer if "[UNK]" in special else trainers.BpeTrainer)(
        vocab_size=1000, special_tokens=special, show_progress=False)
    tok.train_from_iterator((corpus or []) + CORPUS * 5, trainer=trainer)
    if template:
        tok.post_processor = processors.TemplateProcessing(
            single=template, special_tokens=[(t, tok.token_to_id(t)) for t in special if t in template])
    return tok


def build_tiny_nemotron(out: Path, hidden: int = 64, layers: int = 2, prefix_weights: bool = False,
                        corpus: list[str] | None = None) -> Path:
    """Like nvidia/llama-nemotron-embed-1b-v2 on the Hub: remote-code config, Llama keys, no pad token."""
    from transformers import LlamaConfig, LlamaModel

    out.mkdir(parents=True, exist_ok=True)
    tok = _word_tokenizer(["<unk>", "<|begin_of_text|>", "<|end_of_text|>"], "<|begin_of_text|> $A", corpus)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>", "model_max_length": 8192,
         "tokenizer_class": "PreTrainedTokenizerFast"}))
    arch = dict(vocab_size=tok.get_vocab_size(), hidden_size=hidden, intermediate_size=hidden * 2,
                num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4,
                max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=True,
                rope_scaling={"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                              "original_max_position_embeddings": 2048, "rope_type": "llama3"},
                bos_token_id=tok.token_to_id("<|begin_of_text|>"), eos_token_id=tok.token_to_id("<|end_of_text|>"))
    torch.manual_seed(0)
    model = LlamaModel(LlamaConfig(**arch, is_causal=False))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if prefix_weights:  # some exports carry the wrapper's "model." prefix
        state = {f"model.{k}": v for k, v in state.items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps({
        "architectures": ["LlamaBidirectionalModel"],
        "auto_map": {"AutoConfig": "llama_bidirectional_model.LlamaBidirectionalConfig",
                     "AutoModel": "llama_bidirectional_model.LlamaBidirectionalModel"},
        "model_type": "llama_bidirec", "pooling": "avg", "torch_dtype": "bfloat16", **arch}, indent=2))
    return out


def build_tiny_bert(out: Path, hidden: int = 32, corpus: list[str] | None = None) -> Path:
    from transformers import BertConfig, BertModel

    out.mkdir(parents=True, exist_ok=True)
    tok = _word_tokenizer(["[PAD]", "[UNK]", "[CLS]", "[SEP]"], "[CLS] $A [SEP]", corpus)
    tok.enable_padding(pad_id=0, pad_token="[PAD]", length=128)  # like all-MiniLM-L6-v2's tokenizer.json
    tok.save(str(out / "tokenizer.json"))
    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=tok.get_vocab_size(), hidden_size=hidden, num_hidden_layers=2,
                                 num_attention_heads=4, intermediate_size=hidden * 2, max_position_embeddings=256),
                      add_pooling_layer=False)
    model.save_pretrained(out, safe_serialization=True)
    return out
