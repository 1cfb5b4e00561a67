"""The small real model's expanded copy (model_cache.py): read only when complete, keyed
by what produced it, and the same model as the GGUF it came from."""
from __future__ import annotations

import pytest
import torch

from kvcache_repro.backends import model_cache, models


class _Tokenizer:
    def save_pretrained(self, folder):
        (folder / "tokenizer.json").write_text("{}")


def test_the_key_follows_the_file_content_and_the_dtype(tmp_path, monkeypatch):
    monkeypatch.setenv(model_cache.MODEL_CACHE_ENV, str(tmp_path / "cache"))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"weights v1")
    first = model_cache.expanded_dir(gguf, "float32")
    assert first.parent == tmp_path / "cache"
    assert model_cache.expanded_dir(gguf, "bfloat16") != first
    gguf.write_bytes(b"weights v2")  # same size, other content: another copy
    assert model_cache.expanded_dir(gguf, "float32") != first
    monkeypatch.setenv(model_cache.MODEL_CACHE_ENV, "off")
    assert model_cache.expanded_dir(gguf, "float32") is None


def test_a_copy_is_complete_or_absent(tmp_path):
    """Marker written last, folder renamed into place; a copy that cannot be written warns."""
    model = models.tiny_model("llama")
    target = tmp_path / "cache" / "copy"
    model_cache.save_expanded(model, _Tokenizer(), target)
    assert (target / model_cache.COMPLETE).exists() and (target / "model.safetensors").exists()
    assert [p.name for p in target.parent.iterdir()] == ["copy"]  # no temporary folder left

    blocked = tmp_path / "file-not-dir"
    blocked.write_text("")
    with pytest.warns(UserWarning, match="could not keep the expanded model"):
        model_cache.save_expanded(model, _Tokenizer(), blocked / "copy")


@pytest.mark.slow
def test_the_expanded_copy_is_the_gguf_model(tmp_path, monkeypatch):
    """Same weights, same token ids, same logits (to the bit) as expanding the GGUF."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        path = models.small_real_model_path()
    except models.ModelUnavailable as error:
        pytest.skip(str(error))
    monkeypatch.setenv(model_cache.MODEL_CACHE_ENV, str(tmp_path))
    models.small_real_model.cache_clear()
    try:
        models.small_real_model(torch.float32)  # expands and keeps the copy
        models.small_real_model.cache_clear()
        copy, copy_tok = models.small_real_model(torch.float32)  # reads the copy
    finally:
        models.small_real_model.cache_clear()
    gguf_tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    gguf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    a, b = gguf.state_dict(), copy.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    text = "The quick brown fox: def f(x): return x ** 2  # ünïcödé"
    ids = gguf_tok(text, return_tensors="pt")["input_ids"]
    assert torch.equal(ids, copy_tok(text, return_tensors="pt")["input_ids"])
    with torch.no_grad():
        assert torch.equal(gguf(ids).logits, copy(ids).logits)
