"""Loading: a nemotron-style checkpoint without remote code, HF encoders, and the shared tokenizer."""

import json

import torch

from tests.builders import build_tiny_nemotron
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
