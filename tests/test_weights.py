"""Checkpoint loading: every layout the real weights come in gives the same model,
and every way a checkpoint can be wrong gives an error that says what is wrong."""
import copy
import json
import re
import uuid

import fsspec
import pytest
import torch
from diffusers import WanTransformer3DModel
from fsspec.implementations.memory import MemoryFileSystem
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
from safetensors.torch import save_file

from memflow.config import PRESETS
from memflow.weights import (WeightsError, is_wan_layout, load_transformer_weights, read_state_dict, resolve,
                             to_diffusers)

TINY = PRESETS["tiny"].transformer

# diffusers name -> original Wan name, written independently of the code under test.
_TO_WAN = [
    (r"condition_embedder\.time_embedder\.linear_([12])", lambda m: f"time_embedding.{2 * int(m[1]) - 2}"),
    (r"condition_embedder\.text_embedder\.linear_([12])", lambda m: f"text_embedding.{2 * int(m[1]) - 2}"),
    (r"condition_embedder\.time_proj", "time_projection.1"),
    (r"\.attn1\.", ".self_attn."),
    (r"\.attn2\.", ".cross_attn."),
    (r"\.to_([qkv])\.", r".\1."),
    (r"\.to_out\.0\.", ".o."),
    (r"\.ffn\.net\.0\.proj\.", ".ffn.0."),
    (r"\.ffn\.net\.2\.", ".ffn.2."),
    (r"\.norm2\.", ".norm3."),
    (r"^(blocks\.\d+)\.scale_shift_table$", r"\1.modulation"),
    (r"^scale_shift_table$", "head.modulation"),
    (r"^proj_out\.", "head.head."),
]


def wan_name(key):
    for pattern, repl in _TO_WAN:
        key = re.sub(pattern, repl, key)
    return key


def make_model(seed, dims=TINY):
    """A model whose every parameter is random, so any misplaced tensor changes the output."""
    torch.manual_seed(seed)
    model = WanTransformer3DModel(**dims).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model


def run(model):
    g = torch.Generator().manual_seed(123)
    x = torch.randn(1, 16, 3, 8, 8, generator=g)
    text = torch.randn(1, 512, TINY["text_dim"], generator=g)
    with torch.no_grad():
        return model(hidden_states=x, timestep=torch.tensor([500]), encoder_hidden_states=text,
                     return_dict=False)[0]


@pytest.fixture(scope="module")
def ref():
    model = make_model(0)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    return model, run(model), state


@pytest.fixture(scope="module")
def ckpts(ref, tmp_path_factory):
    """The reference weights written in every supported layout."""
    model, _, state = ref
    root = tmp_path_factory.mktemp("ckpts")
    wan = {wan_name(k): v for k, v in state.items()}
    model.save_pretrained(root / "repo" / "transformer")
    model.save_pretrained(root / "sharded", max_shard_size="40KB")
    save_file(wan, root / "wan.safetensors")
    torch.save(wan, root / "wan.pt")
    torch.save(wan, root / "wan.pth")
    other = {"model." + k: v for k, v in make_model(7).state_dict().items()}
    torch.save({"generator": {"model." + k: v for k, v in wan.items()}, "generator_ema": other, "step": 100},
               root / "base.pt")
    return root


def test_wan_names_are_the_original_ones(ref):
    wan = {wan_name(k) for k in ref[2]}
    for key in ("blocks.0.self_attn.q.weight", "blocks.0.cross_attn.o.bias", "blocks.0.ffn.0.weight",
                "blocks.1.ffn.2.bias", "blocks.0.modulation", "blocks.0.norm3.weight", "blocks.0.self_attn.norm_q.weight",
                "head.head.weight", "head.modulation", "time_embedding.0.weight", "time_embedding.2.bias",
                "time_projection.1.weight", "text_embedding.2.weight", "patch_embedding.weight"):
        assert key in wan
    assert is_wan_layout(wan) and not is_wan_layout(ref[2])
    converted = to_diffusers({wan_name(k): v for k, v in ref[2].items()})
    assert converted.keys() == ref[2].keys()
    assert all(converted[k] is v for k, v in ref[2].items())


def test_full_size_names_convert():
    """All 825 keys of Wan2.1-T2V-1.3B (30 blocks, on the meta device: no memory) round-trip."""
    with torch.device("meta"):
        state = WanTransformer3DModel(**PRESETS["wan2.1-1.3b"].transformer).state_dict()
    assert to_diffusers({wan_name(k): v for k, v in state.items()}).keys() == state.keys()


@pytest.mark.parametrize("name", ["repo", "repo/transformer", "sharded", "wan.safetensors", "wan.pt", "wan.pth",
                                  "base.pt"])
def test_every_layout_reproduces_the_reference(ref, ckpts, name):
    if name == "sharded":
        assert (ckpts / name / "diffusion_pytorch_model.safetensors.index.json").exists()
        assert len(list((ckpts / name).glob("*.safetensors"))) > 1
    model = make_model(1)
    assert not torch.equal(run(model), ref[1])
    load_transformer_weights(model, ckpts / name)
    assert torch.equal(run(model), ref[1])


def test_entry_picks_the_ema_weights(ckpts):
    model = make_model(1)
    load_transformer_weights(model, ckpts / "base.pt", entry="generator_ema")
    assert torch.equal(run(model), run(make_model(7)))
    with pytest.raises(WeightsError, match="no entry 'nope'.*generator"):
        read_state_dict(ckpts / "base.pt", entry="nope")


def test_model_dtype_is_respected(ref, ckpts):
    model = make_model(1).to(torch.bfloat16)
    load_transformer_weights(model, ckpts / "wan.safetensors")
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert torch.equal(model.blocks[0].attn1.to_q.weight, ref[2]["blocks.0.attn1.to_q.weight"].bfloat16())


def test_file_url_is_used_in_place(ref, ckpts, tmp_path):
    assert resolve(f"file://{ckpts / 'wan.pt'}", cache_dir=tmp_path) == ckpts / "wan.pt"
    model = make_model(1)
    load_transformer_weights(model, f"file://{ckpts / 'wan.pt'}", cache_dir=tmp_path)
    assert torch.equal(run(model), ref[1])
    assert not any(tmp_path.iterdir())


def test_memory_urls_are_cached_and_load(ref, ckpts, tmp_path):
    fs, base = fsspec.filesystem("memory"), f"/{uuid.uuid4().hex}"
    fs.pipe(f"{base}/wan.safetensors", (ckpts / "wan.safetensors").read_bytes())
    fs.put(str(ckpts / "repo"), f"{base}/repo", recursive=True)
    cache = tmp_path / "cache"
    for name in ("wan.safetensors", "repo"):
        url = f"memory:/{base}/{name}"
        local = resolve(url, cache_dir=cache)
        assert local.name == name and local.is_relative_to(cache)
        model = make_model(1)
        load_transformer_weights(model, url, cache_dir=cache)
        assert torch.equal(run(model), ref[1])
    fs.rm(base, recursive=True)
    assert resolve(f"memory:/{base}/repo", cache_dir=cache) == local  # served from the cache
    with pytest.raises(FileNotFoundError):
        resolve(f"memory:/{base}/gone.pt", cache_dir=cache)


def test_interrupted_download_leaves_nothing_behind(ref, ckpts, tmp_path, monkeypatch):
    fs, url = fsspec.filesystem("memory"), f"memory://{uuid.uuid4().hex}/wan.pt"
    fs.pipe(url, (ckpts / "wan.pt").read_bytes())

    def broken_get(self, rpath, lpath, **kwargs):
        with open(lpath, "wb") as f:
            f.write(b"half a file")
        raise ConnectionError("connection reset")

    monkeypatch.setattr(MemoryFileSystem, "get", broken_get)
    with pytest.raises(ConnectionError):
        resolve(url, cache_dir=tmp_path)
    assert not any(tmp_path.iterdir())
    monkeypatch.undo()
    model = make_model(1)
    load_transformer_weights(model, url, cache_dir=tmp_path)
    assert torch.equal(run(model), ref[1])


def test_missing_and_unexpected_keys_are_named(ref, tmp_path):
    state = dict(ref[2])
    del state["blocks.1.attn2.to_k.weight"]
    state["blocks.0.extra.weight"] = torch.zeros(3)
    save_file(state, tmp_path / "bad.safetensors")
    with pytest.raises(WeightsError) as info:
        load_transformer_weights(make_model(1), tmp_path / "bad.safetensors")
    message = str(info.value)
    assert "bad.safetensors" in message
    assert "1 missing keys: blocks.1.attn2.to_k.weight" in message
    assert "1 unexpected keys: blocks.0.extra.weight" in message

    del state["blocks.0.extra.weight"]
    save_file(state, tmp_path / "partial.safetensors")
    result = load_transformer_weights(make_model(1), tmp_path / "partial.safetensors", strict=False)
    assert result.missing_keys == ["blocks.1.attn2.to_k.weight"]


def test_wrong_size_names_shapes_and_preset(tmp_path):
    save_file(make_model(2, PRESETS["small"].transformer).state_dict(), tmp_path / "small.safetensors")
    with pytest.raises(WeightsError) as info:
        load_transformer_weights(make_model(1), tmp_path / "small.safetensors")
    message = str(info.value)
    assert "blocks.0.attn1.to_q.weight is (256, 256) in the checkpoint but (48, 48) in the model" in message
    assert "unexpected keys: blocks.2." in message
    assert "build the model with preset 'small'" in message


def test_code_in_a_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return open, (str(marker), "w")

    torch.save({"generator": {"blocks.0.modulation": Payload()}}, tmp_path / "evil.pt")
    with pytest.raises(WeightsError, match="refused"):
        load_transformer_weights(make_model(1), tmp_path / "evil.pt")
    assert not marker.exists()


def test_unreadable_sources(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsError, match="holds no model weights"):
        read_state_dict(tmp_path / "empty")
    (tmp_path / "w.gguf").write_bytes(b"x")
    with pytest.raises(WeightsError, match="unknown checkpoint format"):
        read_state_dict(tmp_path / "w.gguf")
    torch.save({"step": 3}, tmp_path / "meta.pt")
    with pytest.raises(WeightsError, match="no state dict of tensors"):
        read_state_dict(tmp_path / "meta.pt")
    with pytest.raises(FileNotFoundError):
        resolve(tmp_path / "nothing.pt")


@pytest.fixture(scope="module")
def lora(ref):
    """A rank-4, alpha-8 PEFT LoRA on every Linear of every block, and its unmerged output."""
    model = copy.deepcopy(ref[0])
    targets = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith("blocks.")]
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=8, target_modules=targets), model)
    torch.manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    adapter = get_peft_model_state_dict(model)
    assert len(adapter) == 2 * len(targets) == 40
    out = run(model)
    assert (out - ref[1]).abs().max() > 0.1
    return adapter, out, model


def _close(a, b):
    return torch.allclose(a, b, rtol=0, atol=1e-5 * b.abs().max().item())


def test_memflow_lora_merges_to_the_unmerged_output(ckpts, lora, tmp_path):
    adapter, out, _ = lora
    torch.save({"generator_lora": {"base_model.model." + wan_name(k): v for k, v in adapter.items()}},
               tmp_path / "lora.pt")
    model = make_model(1)
    load_transformer_weights(model, ckpts / "base.pt", lora=tmp_path / "lora.pt", lora_alpha=8)
    assert _close(run(model), out)

    default = make_model(1)  # without alpha the scale is 1, not 8 / 4
    load_transformer_weights(default, ckpts / "base.pt", lora=tmp_path / "lora.pt")
    assert not _close(run(default), out)

    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8}))
    configured = make_model(1)
    load_transformer_weights(configured, ckpts / "base.pt", lora=tmp_path / "lora.pt")
    assert _close(run(configured), out)


def test_diffusers_named_lora_with_adapter_name(ckpts, lora, tmp_path):
    _, out, model = lora
    raw = {k: v.contiguous() for k, v in model.state_dict().items() if "lora_" in k}
    assert "blocks.0.attn1.to_q.lora_A.default.weight" in raw
    save_file(raw, tmp_path / "lora.safetensors")
    merged = make_model(1)
    load_transformer_weights(merged, ckpts / "sharded", lora=tmp_path / "lora.safetensors", lora_alpha=8)
    assert _close(run(merged), out)


def test_lora_keys_must_hit_a_linear(ckpts, lora, tmp_path):
    adapter = {"base_model.model." + wan_name(k): v for k, v in lora[0].items()}
    adapter["base_model.model.blocks.0.self_attn.zz.lora_A.weight"] = torch.zeros(4, 48)
    adapter["base_model.model.blocks.0.norm3.lora_B.weight"] = torch.zeros(48, 4)
    torch.save({"generator_lora": adapter}, tmp_path / "lora.pt")
    with pytest.raises(WeightsError) as info:
        load_transformer_weights(make_model(1), ckpts / "base.pt", lora=tmp_path / "lora.pt")
    message = str(info.value)
    assert "2 LoRA keys match no Linear" in message
    assert "blocks.0.attn1.zz" in message and "blocks.0.norm2" in message
    assert "converted from the file's original Wan names" in message


def test_lora_of_the_wrong_size_is_refused_before_merging(ckpts, lora, tmp_path):
    adapter = dict(lora[0])
    adapter["blocks.1.ffn.net.2.lora_A.weight"] = torch.zeros(4, 48)  # the Linear takes 96 inputs
    save_file(adapter, tmp_path / "lora.safetensors")
    model = make_model(1)
    with pytest.raises(WeightsError, match=r"blocks\.1\.ffn\.net\.2: A \(4, 48\), B \(48, 4\), weight \(48, 96\)"):
        load_transformer_weights(model, ckpts / "base.pt", lora=tmp_path / "lora.safetensors")
    assert torch.equal(model.blocks[0].attn1.to_q.weight, make_model(0).blocks[0].attn1.to_q.weight)


def test_remote_lora_finds_its_adapter_config(ckpts, lora, tmp_path):
    adapter, out, _ = lora
    fs, base = fsspec.filesystem("memory"), f"/{uuid.uuid4().hex}"
    save_file(adapter, tmp_path / "lora.safetensors")
    fs.pipe(f"{base}/lora.safetensors", (tmp_path / "lora.safetensors").read_bytes())
    fs.pipe(f"{base}/adapter_config.json", json.dumps({"r": 4, "lora_alpha": 8}).encode())
    model = make_model(1)
    load_transformer_weights(model, ckpts / "wan.pt", lora=f"memory:/{base}/lora.safetensors",
                             cache_dir=tmp_path / "cache")
    assert _close(run(model), out)
