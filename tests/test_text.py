import shutil

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

from memflow.config import PRESETS
from memflow.text import TinyTextEncoder, UMT5TextEncoder, build_text_encoder

PROMPTS = ["a cat walks on the beach", "a dog runs in the snow at night"]


def test_tiny_is_deterministic_and_leaves_global_rng_alone():
    torch.manual_seed(1)
    state = torch.get_rng_state()
    a = TinyTextEncoder(32).encode(PROMPTS)
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(2)  # a different global seed must not change the weights
    b = TinyTextEncoder(32).encode(PROMPTS)
    assert torch.equal(a, b)
    assert not torch.equal(a, TinyTextEncoder(32, seed=1).encode(PROMPTS))


def test_tiny_shape_padding_and_prompts_differ():
    enc = TinyTextEncoder(32)
    out = enc.encode(PROMPTS)
    assert out.shape == (2, 512, 32) and out.dtype == torch.float32
    for i, p in enumerate(PROMPTS):
        n = len(p.encode()) + 1  # bytes + eos
        assert out[i, :n].abs().sum(-1).min() > 0
        assert torch.all(out[i, n:] == 0)
    assert not torch.allclose(out[0, :5], out[1, :5])


def test_tiny_truncates_long_prompts():
    enc = TinyTextEncoder(32)
    base = "x" * 600
    out = enc.encode([base, base + " tail that is cut off"])
    assert out.abs().sum(-1).min() > 0  # every one of the 512 positions is a token
    assert torch.equal(out[0], out[1])


def test_cache_is_bounded_lru_and_batch_invariant():
    enc = TinyTextEncoder(32, cache_size=2)
    alone = enc.encode([PROMPTS[1]])[0]
    enc._cache.clear()
    both = enc.encode(PROMPTS)
    assert torch.equal(both[1], alone)  # a prompt's encoding does not depend on its batch
    enc.encode(["third"])
    assert list(enc._cache) == [PROMPTS[1], "third"]
    # cleaned prompts share an entry (Wan collapses whitespace)
    assert torch.equal(enc.encode(["  third \n"])[0], enc.encode(["third"])[0]) and len(enc._cache) == 2


def test_prompt_cleaning_fixes_mojibake_with_ftfy():
    """Wan cleans prompts with ftfy.fix_text (diffusers skips it silently when ftfy is
    missing): a prompt that went through a wrong encoding is the same prompt."""
    enc = TinyTextEncoder(32)
    broken = "a caf\u00c3\u00a9 at night"  # "a café at night" read as latin-1
    assert torch.equal(enc.encode([broken])[0], enc.encode(["a caf\u00e9 at night"])[0])
    assert list(enc._cache) == ["a caf\u00e9 at night"]


def test_to_dtype_still_returns_float32():
    out = TinyTextEncoder(32).to("cpu", torch.bfloat16).encode(PROMPTS[:1])
    assert out.dtype == torch.float32


def _save_tiny_umt5(root):
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(PROMPTS, trainers.WordLevelTrainer(special_tokens=["<pad>", "</s>", "<unk>"]))
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(root / "tokenizer")
    torch.manual_seed(0)
    cfg = UMT5Config(vocab_size=32, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2, dropout_rate=0.0,
                     feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    UMT5EncoderModel(cfg).save_pretrained(root / "text_encoder")


def _reference(root, prompts):
    tok = AutoTokenizer.from_pretrained(root / "tokenizer")
    model = UMT5EncoderModel.from_pretrained(root / "text_encoder").eval()
    t = tok(prompts, padding="max_length", max_length=512, truncation=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(t.input_ids, t.attention_mask).last_hidden_state
    return hidden * t.attention_mask[..., None], t.attention_mask.sum(1)


def test_umt5_from_diffusers_layout_matches_model(tmp_path):
    _save_tiny_umt5(tmp_path)
    enc = UMT5TextEncoder.from_pretrained(str(tmp_path))
    out = enc.encode(PROMPTS)
    ref, lens = _reference(tmp_path, PROMPTS)
    assert out.shape == (2, 512, 16)
    assert torch.allclose(out, ref, atol=1e-6)
    assert lens.tolist() == [7, 9] and torch.all(out[0, 7:] == 0)


def test_umt5_from_flat_folder(tmp_path):
    _save_tiny_umt5(tmp_path)
    flat = tmp_path / "flat"
    for sub in ("tokenizer", "text_encoder"):
        shutil.copytree(tmp_path / sub, flat, dirs_exist_ok=True)
    out = UMT5TextEncoder.from_pretrained(str(flat)).encode(PROMPTS[:1])
    assert torch.allclose(out, _reference(tmp_path, PROMPTS[:1])[0], atol=1e-6)


def test_build_text_encoder():
    enc = build_text_encoder(PRESETS["tiny"], None, "cpu", torch.float32)
    assert isinstance(enc, TinyTextEncoder) and enc.encode(["a"]).shape == (1, 512, 32)
    with pytest.raises(ValueError, match="text_encoder/"):
        build_text_encoder(PRESETS["wan2.1-1.3b"], None, "cpu", torch.float32)
