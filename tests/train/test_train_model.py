import importlib.util

import pytest
import torch
import torch.nn.functional as F

from halfbyte.train.model import GPT, GPTConfig, build_model, generate, gpt_param_groups


def _small(**kw):
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=97, n_layer=2, n_head=2, d_model=32, ctx=16, **kw))


@pytest.mark.parametrize("rope", [True, False])
def test_forward_shapes_and_causality(rope):
    model = _small(rope=rope)
    idx = torch.randint(0, 97, (3, 16))
    logits = model(idx)
    assert logits.shape == (3, 16, 97) and torch.isfinite(logits).all()
    changed = idx.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % 97  # the future must not change earlier positions
    assert torch.allclose(model(changed)[:, :10], logits[:, :10], atol=1e-5)
    assert not torch.allclose(model(changed)[:, 10:], logits[:, 10:], atol=1e-3)
    assert (model.wpe is None) == rope
    with pytest.raises(ValueError, match="exceeds the model's context 16"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_weight_tying():
    model = _small()
    assert model.lm_head.weight is model.wte.weight
    names = [n for n, _ in model.named_parameters()]
    assert "lm_head.weight" not in names  # one parameter, counted and communicated once
    per_block = 4 * 32 * 32 + 2 * 4 * 32 * 32 + 2 * 32
    assert model.num_params() == 97 * 32 + 2 * per_block + 32
    idx = torch.randint(0, 97, (2, 8))
    F.cross_entropy(model(idx).flatten(0, 1), idx.flatten()).backward()
    assert model.wte.weight.grad is model.lm_head.weight.grad and model.wte.weight.grad.abs().sum() > 0


def test_tiny_preset_learns_a_batch():
    torch.manual_seed(0)
    model = build_model("tiny", 4096, n_layer=1)
    assert model.cfg.d_model == 128 and model.cfg.ctx == 128 and model.cfg.n_layer == 1
    idx = torch.randint(0, 4096, (2, 33))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(5):
        loss = F.cross_entropy(model(idx[:, :-1]).flatten(0, 1), idx[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert abs(losses[0] - torch.log(torch.tensor(4096.0)).item()) < 0.2  # starts near uniform
    assert losses[-1] < losses[0] - 1.0


def test_generate_appends_tokens_and_crops_context():
    model = _small()
    out = generate(model, torch.zeros(2, 3, dtype=torch.long), 20, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 23) and out.max() < 97 and model.training


def test_bad_model_names():
    with pytest.raises(ValueError, match="model 'huge' is unknown"):
        build_model("huge", 100)
    with pytest.raises(ValueError, match="must be divisible by model.n_head"):
        GPTConfig(vocab_size=10, d_model=30, n_head=4)
    if importlib.util.find_spec("transformers") is None:
        with pytest.raises(ValueError, match="needs the transformers package"):
            build_model("hf:/some/dir", 100)


def test_gpt_param_groups_keep_decay_off_embeddings_norms_and_biases():
    model = _small()
    decay, no_decay = gpt_param_groups(model, 0.1)
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.1, 0.0)
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[id(p)] for p in no_decay["params"]) == sorted(
        ["wte.weight", "ln_f.weight"] + [f"blocks.{i}.{ln}.weight" for i in range(2) for ln in ("ln_attn", "ln_mlp")])
    assert all(p.dim() == 2 and names[id(p)].startswith("blocks.") for p in decay["params"])  # the Linear matrices
    assert len(decay["params"]) + len(no_decay["params"]) == len(names)  # each trainable parameter once (tied: wte)
    model.blocks[0].ln_attn.weight.requires_grad_(False)
    assert sum(len(g["params"]) for g in gpt_param_groups(model, 0.1)) == len(names) - 1  # trainable only
    torch.optim.AdamW(gpt_param_groups(model, 0.1))  # the format torch.optim takes


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="needs transformers (the .[hf] extra)")
def test_hf_directory_with_only_a_config_builds_a_random_model_and_says_so(tmp_path, caplog):
    """The usual start of a pre-training run: a config.json and no weights (transformers' from_pretrained
    raised OSError: no model.safetensors). Built from the config with torch's RNG, and a warning says so;
    a directory with weights still loads them."""
    import json

    config = {"model_type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
              "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2,
              "max_position_embeddings": 16, "tie_word_embeddings": False}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with caplog.at_level("WARNING", logger="halfbyte.train.model"):
        torch.manual_seed(0)
        model = build_model(f"hf:{tmp_path}", 0)
    assert not model.pretrained and "no weights (only config.json)" in caplog.text
    assert "random initialization" in caplog.text
    torch.manual_seed(0)
    again = build_model(f"hf:{tmp_path}", 0)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), again.parameters()))  # seeded init
    assert model(torch.zeros(2, 16, dtype=torch.long)).shape == (2, 16, 64) and model.ctx == 16
    decay, no_decay = gpt_param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert "hf.model.embed_tokens.weight" in {names[id(p)] for p in no_decay["params"]}
    assert "hf.lm_head.weight" in {names[id(p)] for p in decay["params"]}  # untied: a Linear matrix
    assert all(p.dim() == 1 for p in no_decay["params"] if names[id(p)] != "hf.model.embed_tokens.weight")

    saved = tmp_path / "pretrained"
    model.hf.save_pretrained(saved)
    loaded = build_model(f"hf:{saved}", 0)
    assert loaded.pretrained and all(torch.equal(p, q) for p, q in zip(loaded.parameters(), model.parameters()))
