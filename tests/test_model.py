"""Loading: a nemotron-style checkpoint without remote code, HF encoders, and the shared tokenizer."""

import json

import pytest
import torch

from bench.builders import build_tiny_nemotron
from train.model import BiEncoder, inspect_model, load_backbone
from rayembed.artifact import TextTokenizer


def test_nemotron_layout_loads_as_bidirectional_llama_without_remote_code(tiny_nemotron):
    config = json.loads((tiny_nemotron / "config.json").read_text())
    assert config["model_type"] == "llama_bidirec" and "auto_map" in config  # the Hub's layout
    info = inspect_model(str(tiny_nemotron))
    assert info.family == "llama_bidirectional" and info.prefixes == ("query: ", "passage: ")
    model = load_backbone(info).eval()
    assert model.config.is_causal is False
    ids = torch.tensor([[1, 5, 6, 7]])
    changed = ids.clone()
    changed[0, 3] = 9
    with torch.no_grad():
        a = model(input_ids=ids).last_hidden_state[0, 0]
        b = model(input_ids=changed).last_hidden_state[0, 0]
    assert not torch.allclose(a, b), "the first token must see later tokens (bidirectional attention)"


def test_weights_with_model_prefix_load_identically(tiny_nemotron, tmp_path, corpus):
    prefixed = build_tiny_nemotron(tmp_path / "prefixed", prefix_weights=True, corpus=corpus)
    a = load_backbone(inspect_model(str(tiny_nemotron))).state_dict()
    b = load_backbone(inspect_model(str(prefixed))).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_llama_tokenizer_without_pad_token_pads_with_eos_and_masks(tiny_nemotron):
    tok = TextTokenizer(tiny_nemotron, max_length=8)
    ids, mask = tok(["query: perl module", "passage: a library for parsing json documents in python and more"])
    assert tok.pad_id == tok.tokenizer.token_to_id("<|end_of_text|>")
    assert ids.shape == (2, 8) and mask[0].sum() < 8 and mask[1].sum() == 8
    assert ids[0, 0] == tok.tokenizer.token_to_id("<|begin_of_text|>")


def test_padding_does_not_change_embeddings(tiny_nemotron):
    info = inspect_model(str(tiny_nemotron))
    model = BiEncoder(load_backbone(info)).eval()
    tok = TextTokenizer(info.path, 64)
    alone = tok(["perl module"])
    batch = tok(["perl module", "a library for parsing json documents in python"])
    with torch.no_grad():
        x = model(*map(torch.from_numpy, alone))[0]
        y = model(*map(torch.from_numpy, batch))[0]
    assert torch.allclose(x, y, atol=1e-5)


def test_packaged_minilm_tokenizer_does_not_pad_to_128():
    tok = TextTokenizer(inspect_model("all-MiniLM-L6-v2").path, max_length=128)
    ids, mask = tok(["short text", "another short text here"])
    assert ids.shape[1] < 10 and mask.sum(1).tolist() == [4, 6]
    long_ids, _ = tok(["word " * 500])
    assert long_ids.shape[1] == 128 and long_ids[0, -1] == 102  # truncated, [SEP] kept


def test_length_buckets_give_the_embeddings_and_gradients_of_one_padded_forward(tiny_bert, tiny_nemotron):
    from train.model import build_bi_encoder
    from train.step import encode_bucketed

    texts = ["a", "perl module for parsing json documents quickly", "tool", "a library for images and more words",
             "x y", "compress files with a fast algorithm", "z", "q w e r t y"]
    for path in (tiny_bert, tiny_nemotron):
        info = inspect_model(str(path))
        model = build_bi_encoder(info, "all_weights").eval()  # no dropout: the same numbers both ways
        ids, mask = (torch.from_numpy(a) for a in TextTokenizer(path, max_length=32)(texts))
        assert len(set(mask.sum(1).tolist())) > 3  # lengths vary: the buckets really cut padding
        whole = model(ids, mask)  # [8, H]
        whole.sum().backward()
        want = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        for rows in (1, 3, 8):
            got = encode_bucketed(model, ids, mask, rows)
            assert torch.allclose(got, whole, atol=1e-5), (path.name, rows)
        model.zero_grad()
        encode_bucketed(model, ids, mask, 3).sum().backward()
        assert all(torch.allclose(p.grad, w, atol=1e-4) for p, w in zip(model.parameters(), want))


def _step_fixture(path, cached: bool, micro: int, dropout: bool):
    """A tiny bi-encoder, a job config and 8 queries (each with a positive and one hard negative) tokenized
    into micro-batches of `micro` queries."""
    from train.config import validate_config
    from train.data import Example
    from train.model import build_bi_encoder
    from train.step import tokenize

    cfg = validate_config({"model": str(path), "dataset": {"training": "t.jsonl"}, "output": {"dir": "out"},
                           "precision": "fp32", "batch": {"global_batch_size": 8, "micro_batch_size": micro},
                           "loss": {"in_batch_negatives": True, "negatives_per_query": 1, "cached": cached,
                                    "temperature": 0.05}})
    torch.manual_seed(0)
    model = build_bi_encoder(inspect_model(str(path)), "all_weights")
    model.train(dropout)
    examples = [Example(f"query {i} about {w}", f"a package that does {w} well", [f"unrelated {w} text {i}"])
                for i, w in enumerate(["images", "json parsing", "fonts", "audio mixing", "compression", "mail",
                                       "a web server", "disk usage"])]
    tok = TextTokenizer(path, max_length=32)
    batches = [tokenize(tok, examples[i:i + micro], ("", ""), 1) for i in range(0, 8, micro)]
    return cfg, model, batches, [inspect_model(str(path)).hidden_size]


def _grads(model):
    return [p.grad.clone() for p in model.parameters() if p.grad is not None]


def test_cached_loss_gives_the_gradients_of_one_forward_over_the_whole_batch(tiny_bert, tiny_nemotron):
    """loss.cached (GradCache): four micro-batches of 2 give the loss and the gradients of one batch of 8,
    every query against all 16 documents; plain accumulation does not (its negatives are 4 per query)."""
    from train.step import cached_backward, micro_batch_loss

    for path in (tiny_bert, tiny_nemotron):
        cfg_whole, model, whole, dims = _step_fixture(path, cached=False, micro=8, dropout=False)
        want_loss = micro_batch_loss(model, whole[0], cfg_whole, torch.device("cpu"), dims)
        want_loss.backward()
        want = _grads(model)

        cfg, _, parts, _ = _step_fixture(path, cached=True, micro=2, dropout=False)
        model.zero_grad()
        got_loss = cached_backward(model, parts, cfg, torch.device("cpu"), dims)
        assert torch.allclose(got_loss, want_loss.detach(), atol=1e-5), path.name
        assert len(_grads(model)) == len(want)
        assert all(torch.allclose(g, w, atol=1e-5, rtol=1e-4) for g, w in zip(_grads(model), want)), path.name

        model.zero_grad()  # accumulation: a different loss, so different gradients
        for mb in parts:
            (micro_batch_loss(model, mb, cfg, torch.device("cpu"), dims) / 4).backward()
        assert not all(torch.allclose(g, w, atol=1e-5, rtol=1e-4) for g, w in zip(_grads(model), want))


def test_cached_loss_replays_dropout_so_the_gradients_match_the_first_pass(tiny_bert):
    """With dropout on, the re-forward must use the dropout masks of the pass whose embeddings made the
    loss: the reference keeps every micro-batch's graph (memory of the whole batch) from the same seed."""
    from train.step import cached_backward, embed_micro_batch, embedding_loss

    cfg, model, parts, dims = _step_fixture(tiny_bert, cached=True, micro=2, dropout=True)
    assert any(m.p > 0 for m in model.modules() if isinstance(m, torch.nn.Dropout))
    cpu = torch.device("cpu")
    torch.manual_seed(123)
    embedded = [embed_micro_batch(model, mb, cfg, cpu) for mb in parts]
    want_loss = embedding_loss(torch.cat([q for q, _ in embedded]), torch.cat([d for _, d in embedded]),
                               torch.cat([mb.d_keys for mb in parts]), cfg, dims)
    want_loss.backward()
    want = _grads(model)
    model.zero_grad()
    torch.manual_seed(123)
    got_loss = cached_backward(model, parts, cfg, cpu, dims)
    assert torch.allclose(got_loss, want_loss.detach(), atol=1e-5)
    assert all(torch.allclose(g, w, atol=1e-5, rtol=1e-4) for g, w in zip(_grads(model), want))


def test_cached_loss_needs_in_batch_negatives():
    from train.config import ConfigError, validate_config

    with pytest.raises(ConfigError, match="loss.cached changes nothing without loss.in_batch_negatives: true"):
        validate_config({"model": "m", "dataset": {"training": "t.jsonl"}, "output": {"dir": "out"},
                         "loss": {"cached": True}})
