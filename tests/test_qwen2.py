"""Qwen2 (Flax NNX) parity against transformers' Qwen2ForCausalLM, KV cache, decoding, converter."""

from __future__ import annotations

import dataclasses
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import unified_mm  # noqa: F401  (sets nnx.use_eager_sharding(False))
from unified_mm.models.llm import qwen2_convert as qc
from unified_mm.models.llm.decoding import generate
from unified_mm.models.llm.qwen2 import KVCache, Qwen2, Qwen2Config, default_positions

torch = pytest.importorskip("torch", reason="parity tests need torch (the 'convert' extra)")
transformers = pytest.importorskip("transformers", reason="parity tests need transformers")

FIXTURE = pathlib.Path(__file__).parent / "data" / "harmon_tiny"
TOL = 1e-4
VOCAB = 128


def _maxdiff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


# Jitted entry points shared by the tests: eager calls would re-trace the layer scan every time.
@nnx.jit
def _fwd(m, x, mask=None, pos=None, cache=None):
    return m(x, attention_mask=mask, position_ids=pos, cache=cache)


@nnx.jit
def _logits(m, x):
    return m.logits(m(x)[0])


_generate = nnx.jit(
    generate, static_argnames=("max_new_tokens", "eos_id", "pad_id", "top_k", "greedy")
)


def _loaded(cfg: Qwen2Config, params: dict) -> Qwen2:
    """A model built abstractly (no random init) and filled with `params`."""
    m = nnx.eval_shape(lambda: Qwen2(cfg, rngs=nnx.Rngs(0)))
    qc.load_params_into(m, params)
    return m


@pytest.fixture(scope="module")
def hf_model():
    torch.manual_seed(0)
    hf_cfg = transformers.Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_parameters={"rope_type": "default", "rope_theta": 1e4},
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        attn_implementation="eager",
    )
    model = transformers.Qwen2ForCausalLM(hf_cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            # Non-trivial biases and norm scales; larger q/k weights so that attention (and thus
            # RoPE, masks and positions) visibly shapes the output, while activations stay O(10).
            base = 1.0 if name.endswith("layernorm.weight") or name == "model.norm.weight" else 0.0
            scale = 3.0 if ("q_proj" in name or "k_proj" in name) else 1.0
            noise = 0.1 if p.ndim == 1 else 0.02
            p.copy_(base + p * scale + noise * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def cfg(hf_model) -> Qwen2Config:
    return Qwen2Config.from_hf_dict(hf_model.config.to_dict())


@pytest.fixture(scope="module")
def hf_state(hf_model) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in hf_model.state_dict().items()}


@pytest.fixture(scope="module")
def params(hf_state, cfg) -> dict:
    return qc.params_from_hf(hf_state, cfg)


@pytest.fixture(scope="module")
def model(cfg, params) -> Qwen2:
    return _loaded(cfg, params)


def _ids(b: int, t: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, size=(b, t)).astype(np.int64)


def _hf_hidden(hf_model, ids, mask=None, pos=None) -> np.ndarray:
    kw = {}
    if mask is not None:
        kw["attention_mask"] = torch.from_numpy(np.asarray(mask, np.int64))
    if pos is not None:
        kw["position_ids"] = torch.from_numpy(np.asarray(pos, np.int64))
    with torch.no_grad():
        out = hf_model.model(input_ids=torch.from_numpy(ids), **kw)
    return out.last_hidden_state.numpy()


def test_config_from_hf_dict(cfg):
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (4, 2, 16)
    assert cfg.rope_theta == 1e4 and cfg.tie_word_embeddings
    with pytest.raises(ValueError, match="dtype"):
        Qwen2Config(8, 8, 8, 1, 2, 1, 4, dtype="float16")
    with pytest.raises(ValueError, match="multiple"):
        Qwen2Config(8, 8, 8, 1, 3, 2, 4)
    with pytest.raises(ValueError, match="rope type"):
        Qwen2Config.from_hf_dict(
            dict(
                vocab_size=8,
                hidden_size=8,
                intermediate_size=8,
                num_hidden_layers=1,
                num_attention_heads=2,
                rope_scaling={"type": "yarn", "factor": 4.0},
            )
        )


def test_partitioning_names(model):
    specs = nnx.to_pure_dict(nnx.get_partition_spec(nnx.state(model, nnx.Param)))
    assert tuple(specs["embed_tokens"]) == ("vocab", "embed")
    attn = specs["layers"]["self_attn"]
    assert tuple(attn["q_proj"]["kernel"]) == ("layers", "embed", "heads")
    assert tuple(attn["k_proj"]["bias"]) == ("layers", "kv")
    assert tuple(attn["o_proj"]["kernel"]) == ("layers", "heads", "embed")
    assert tuple(specs["layers"]["mlp"]["down_proj"]["kernel"]) == ("layers", "mlp", "embed")
    assert tuple(specs["layers"]["input_layernorm"]["scale"]) == ("layers", "norm")
    assert tuple(specs["norm"]["scale"]) == ("norm",)


@pytest.mark.parity
def test_logits_match_hf(hf_model, model):
    ids = _ids(2, 11, seed=1)
    with torch.no_grad():
        ref = hf_model(input_ids=torch.from_numpy(ids)).logits.numpy()
    hidden, cache = _fwd(model, model.embed(jnp.asarray(ids)))
    assert cache is None
    ours = model.logits(hidden)
    assert ours.dtype == jnp.float32
    diff = _maxdiff(ours, ref)
    print(f"logits vs HF: max abs diff {diff:.3g} (max |logit| {np.abs(ref).max():.3g})")
    assert diff <= TOL


@pytest.mark.parity
def test_right_padding_matches_hf(hf_model, model):
    ids = _ids(2, 11, seed=2)
    mask = np.ones((2, 11), np.int32)
    mask[0, 7:] = 0
    mask[1, 4:] = 0
    pos = np.asarray(default_positions(jnp.asarray(mask)))
    assert pos[0].tolist() == [0, 1, 2, 3, 4, 5, 6, 6, 6, 6, 6]
    ref = _hf_hidden(hf_model, ids, mask, pos)
    emb = model.embed(jnp.asarray(ids))
    ours, _ = _fwd(model, emb, jnp.asarray(mask), jnp.asarray(pos))
    ours_default, _ = _fwd(model, emb, jnp.asarray(mask))
    valid = mask.astype(bool)
    diff = _maxdiff(np.asarray(ours)[valid], ref[valid])
    print(f"right padding hidden vs HF (valid positions): max abs diff {diff:.3g}")
    assert diff <= TOL
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(ours_default))
    # The mask must matter: without it, row 0's valid tokens are unchanged (causal) but its
    # padded tail differs, and a row with pads in front would change everywhere.
    unmasked, _ = _fwd(model, emb)
    assert _maxdiff(np.asarray(unmasked)[0, 7:], np.asarray(ours)[0, 7:]) > 1e-3


@pytest.mark.parity
def test_cache_step_by_step_equals_full(model):
    ids = jnp.asarray(_ids(2, 11, seed=3))
    emb = model.embed(ids)
    full, _ = _fwd(model, emb)
    cache = model.init_cache(2, 11)
    prompt_hidden, cache = _fwd(model, emb[:, :6], jnp.ones((2, 6), jnp.int32), cache=cache)
    outs = [prompt_hidden]
    for i in range(6, 11):
        h, cache = _fwd(model, emb[:, i : i + 1], cache=cache)
        outs.append(h)
    assert int(cache.length) == 11 and cache.positions.tolist() == [11, 11]
    diff = _maxdiff(jnp.concatenate(outs, axis=1), full)
    print(f"cached step-by-step vs uncached: max abs diff {diff:.3g}")
    assert diff <= 1e-5
    with pytest.raises(ValueError, match="overflow"):
        model(emb[:, :1], cache=cache)


@pytest.mark.parity
def test_generate_matches_hf(hf_model, model):
    ids = _ids(2, 7, seed=4)
    n = 6

    def hf_generate(eos, pad):
        with torch.no_grad():
            out = hf_model.generate(
                torch.from_numpy(ids),
                attention_mask=torch.ones(ids.shape, dtype=torch.long),
                do_sample=False,
                use_cache=True,
                max_new_tokens=n,
                min_new_tokens=0,
                eos_token_id=eos,
                pad_token_id=pad,
                output_logits=True,
                return_dict_in_generate=True,
            )
        new = out.sequences[:, ids.shape[1] :].numpy()
        return new, np.stack([x.numpy() for x in out.logits], axis=1)

    free_ids, _ = hf_generate(None, 0)
    # An EOS that row 0 emits at step 1 exercises "finished rows emit pad".
    eos = int(free_ids[0, 1])
    pad = next(i for i in range(VOCAB) if i != eos)
    ref_ids, ref_logits = hf_generate(eos, pad)
    emb = model.embed(jnp.asarray(ids))
    ours_ids, ours_logits = _generate(model, emb, None, max_new_tokens=n, eos_id=eos, pad_id=pad)
    ours_ids, ours_logits = np.asarray(ours_ids), np.asarray(ours_logits)
    steps = ref_ids.shape[1]  # HF stops early once every row is done
    print(f"HF ids {ref_ids.tolist()}, ours {ours_ids.tolist()} (eos {eos}, pad {pad})")
    np.testing.assert_array_equal(ours_ids[:, :steps], ref_ids)
    diff = _maxdiff(ours_logits[:, :steps], ref_logits)
    print(f"generate step logits vs HF: max abs diff {diff:.3g}")
    assert diff <= TOL
    first_eos = int(np.argmax(ours_ids[0] == eos))
    assert first_eos <= 1 and np.all(ours_ids[0, first_eos + 1 :] == pad)


@pytest.mark.parity
def test_harmon_like_prefix_cache(hf_model, model, cfg):
    b, t_text, n_img = 2, 6, 5
    ids = _ids(b, t_text, seed=5)
    text_mask = np.ones((b, t_text), np.int32)
    text_mask[1, 3:] = 0
    img = jax.random.normal(jax.random.key(0), (2, b, n_img, cfg.hidden_size), jnp.float32)
    text = model.embed(jnp.asarray(ids))
    mask = jnp.concatenate([jnp.asarray(text_mask), jnp.ones((b, n_img), jnp.int32)], axis=1)

    # (a) one uncached pass, positions cumsum(mask) - 1
    full = [_fwd(model, jnp.concatenate([text, img[j]], axis=1), mask)[0] for j in (0, 1)]
    # (b) text prefilled once; the same prefix cache serves two different image parts
    _, prefix = _fwd(model, text, jnp.asarray(text_mask), cache=model.init_cache(b, 11))
    assert prefix.positions.tolist() == [6, 3]
    for j in (0, 1):
        cached, grown = _fwd(model, img[j], cache=prefix)
        assert int(grown.length) == t_text + n_img and int(prefix.length) == t_text
        diff = _maxdiff(cached, full[j][:, t_text:])
        print(f"harmon-like image part, cached vs uncached (image set {j}): {diff:.3g}")
        assert diff <= 1e-5
    assert _maxdiff(full[0][:, t_text:], full[1][:, t_text:]) > 1e-2

    # HF with the same mask and positions (image rows as inputs_embeds).
    pos = default_positions(mask)
    with torch.no_grad():
        ref = hf_model.model(
            inputs_embeds=torch.from_numpy(np.array(jnp.concatenate([text, img[0]], axis=1))),
            attention_mask=torch.from_numpy(np.asarray(mask, np.int64)),
            position_ids=torch.from_numpy(np.asarray(pos, np.int64)),
        ).last_hidden_state.numpy()
    diff = _maxdiff(full[0][:, t_text:], ref[:, t_text:])
    print(f"harmon-like image part vs HF: max abs diff {diff:.3g}")
    assert diff <= TOL


def test_convert_round_trip_and_errors(hf_state, params, cfg, model):
    back = qc.hf_from_params(params, cfg)
    assert back.keys() == hf_state.keys()
    for k, v in hf_state.items():
        np.testing.assert_array_equal(back[k], v, err_msg=k)
    again = qc.params_from_hf(back, cfg)
    jax.tree.map(np.testing.assert_array_equal, again, params)

    bad = dict(hf_state)
    del bad["model.layers.1.mlp.up_proj.weight"]
    bad["model.layers.0.self_attn.extra.weight"] = np.zeros(3, np.float32)
    bad["model.norm.weight"] = np.zeros(63, np.float32)
    with pytest.raises(ValueError) as err:
        qc.params_from_hf(bad, cfg)
    msg = str(err.value)
    for name in (
        "model.layers.1.mlp.up_proj.weight",
        "self_attn.extra.weight",
        "model.norm.weight",
    ):
        assert name in msg, msg

    untied = dict(hf_state)
    untied["lm_head.weight"] = hf_state["lm_head.weight"] + 1.0
    with pytest.raises(ValueError, match="tied embedding"):
        qc.params_from_hf(untied, cfg)
    no_head = {k: v for k, v in hf_state.items() if k != "lm_head.weight"}
    jax.tree.map(np.testing.assert_array_equal, qc.params_from_hf(no_head, cfg), params)

    wrong = jax.tree.map(lambda x: x, params)
    wrong["norm"]["scale"] = np.zeros(3, np.float32)
    del wrong["layers"]["mlp"]["up_proj"]
    with pytest.raises(ValueError, match=r"norm\.scale.*|layers\.mlp\.up_proj") as err:
        qc.load_params_into(model, wrong)
    assert "norm.scale" in str(err.value) and "layers.mlp.up_proj.kernel" in str(err.value)


def test_load_sharded_bf16_safetensors(tmp_path, hf_state):
    from safetensors.torch import save_file

    keys = sorted(hf_state)
    half = len(keys) // 2
    tensors = {k: torch.from_numpy(hf_state[k]).to(torch.bfloat16) for k in keys}
    shards = {"a.safetensors": keys[:half], "b.safetensors": keys[half:]}
    for name, ks in shards.items():
        save_file({k: tensors[k] for k in ks}, str(tmp_path / name))
    index = {"weight_map": {k: name for name, ks in shards.items() for k in ks}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    loaded = qc.load_hf_safetensors(tmp_path)
    assert sorted(loaded) == keys
    for k in keys:
        np.testing.assert_array_equal(loaded[k].astype(np.float32), tensors[k].float().numpy())
    (tmp_path / "b.safetensors").unlink()
    with pytest.raises(ValueError, match="b.safetensors"):
        qc.load_hf_safetensors(tmp_path / "model.safetensors.index.json")


def test_untied_head_round_trip(cfg, params):
    cfg_u = dataclasses.replace(cfg, tie_word_embeddings=False)
    abstract = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: Qwen2(cfg_u, rngs=nnx.Rngs(0)))))
    assert abstract["lm_head"]["kernel"].shape == (cfg.hidden_size, VOCAB)
    head = np.random.default_rng(8).normal(size=(cfg.hidden_size, VOCAB)).astype(np.float32)
    params_u = {**params, "lm_head": {"kernel": head}}
    sd = qc.hf_from_params(params_u, cfg_u)
    np.testing.assert_array_equal(sd["lm_head.weight"], head.T)
    jax.tree.map(np.testing.assert_array_equal, qc.params_from_hf(sd, cfg_u), params_u)
    m = _loaded(cfg_u, params_u)
    x = m.embed(jnp.asarray(_ids(1, 6, seed=9)))
    h, _ = _fwd(m, x)
    np.testing.assert_allclose(m.logits(h), np.asarray(h) @ head, atol=1e-5)


def test_bf16_and_remat(cfg, params, model):
    ids = jnp.asarray(_ids(2, 9, seed=6))
    ref = _logits(model, model.embed(ids))
    m16 = _loaded(dataclasses.replace(cfg, dtype="bfloat16"), params)
    assert m16.embed_tokens[...].dtype == jnp.float32  # params stay float32
    h16, _ = _fwd(m16, m16.embed(ids))
    assert h16.dtype == jnp.bfloat16
    logits16 = m16.logits(h16)
    assert logits16.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(logits16)))
    rel = _maxdiff(logits16, ref) / float(jnp.max(jnp.abs(ref)))
    print(f"bf16 vs fp32 logits: max abs diff / max |logit| = {rel:.3g}")
    assert rel < 0.05

    mr = _loaded(dataclasses.replace(cfg, remat=True), params)

    @nnx.jit
    def grads(m):
        return nnx.grad(lambda m: jnp.mean(m.logits(m(m.embed(ids))[0]) ** 2))(m)

    # Leaves, not pure dicts: nnx.grad returns a State in graph mode and a Module in tree mode.
    g_plain, g_remat = jax.tree.leaves(grads(model)), jax.tree.leaves(grads(mr))
    assert len(g_plain) == len(g_remat) == 14
    for a, b in zip(g_plain, g_remat, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_sampled_generate_is_keyed(model):
    emb = model.embed(jnp.asarray(_ids(2, 4, seed=7)))
    kw = dict(max_new_tokens=3, eos_id=-1, pad_id=0, greedy=False, temperature=2.0, top_k=5)
    a, la = _generate(model, emb, key=jax.random.key(1), **kw)
    b, _ = _generate(model, emb, key=jax.random.key(1), **kw)
    c, _ = _generate(model, emb, key=jax.random.key(2), **kw)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)  # temperature 2 over the top 5: another key differs
    # every sampled token lies in that step's top-5
    top5 = jax.lax.top_k(la, 5)[1]
    assert bool(jnp.all(jnp.any(top5 == a[..., None], axis=-1)))
    with pytest.raises(ValueError, match="key"):
        generate(model, emb, max_new_tokens=2, eos_id=1, pad_id=0, greedy=False)


# ---------------------------------------------------------------------------------------------
# The Harmon tiny fixture (official Harmon + transformers Qwen2ForCausalLM outputs)
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def harmon_llm():
    d = json.loads((FIXTURE / "config.json").read_text())
    cfg = Qwen2Config.from_hf_dict(d["llm"])
    sd = qc.load_hf_safetensors(FIXTURE / "harmon.safetensors")
    sd = {k: v for k, v in sd.items() if k.startswith("llm.")}
    params = qc.params_from_hf(sd, cfg, prefix="llm.model.", lm_head_key="llm.lm_head.weight")
    return _loaded(cfg, params), dict(np.load(FIXTURE / "io.npz")), d


@pytest.mark.parity
def test_harmon_fixture_understanding(harmon_llm):
    m, io, d = harmon_llm
    emb = jnp.asarray(io["und_inputs_embeds"])
    logits = _logits(m, emb)
    diff = _maxdiff(logits, io["und_logits"])
    print(f"harmon_tiny und_logits: max abs diff {diff:.3g}")
    assert diff <= TOL
    eos = d["fixture"]["eos_token_id"]
    ids, step_logits = _generate(m, emb, max_new_tokens=4, eos_id=eos, pad_id=eos)
    np.testing.assert_array_equal(np.asarray(ids), io["und_generated_ids"])
    diff = _maxdiff(step_logits, io["und_generated_logits"])
    print(f"harmon_tiny und_generated_logits: max abs diff {diff:.3g}")
    assert diff <= TOL


@pytest.mark.parity
def test_harmon_fixture_generation_hidden(harmon_llm):
    m, io, _ = harmon_llm
    text_mask = jnp.asarray(io["gen_attention_mask"])
    text = m.embed(jnp.asarray(io["gen_input_ids"]))
    img = jnp.asarray(io["enc_z_enc"])  # proj_in(x_enc), buffers last: the LLM's image rows
    t = text.shape[1]
    mask = jnp.concatenate([text_mask, jnp.ones(img.shape[:2], text_mask.dtype)], axis=1)
    np.testing.assert_array_equal(np.asarray(default_positions(mask)), io["gen_position_ids"])
    full, _ = _fwd(m, jnp.concatenate([text, img], axis=1), mask)
    diff = _maxdiff(full[:, t:], io["gen_llm_hidden_image"])
    print(f"harmon_tiny gen_llm_hidden_image (uncached): max abs diff {diff:.3g}")
    assert diff <= TOL
    _, prefix = _fwd(m, text, text_mask, cache=m.init_cache(2, t + img.shape[1]))
    cached, _ = _fwd(m, img, cache=prefix)
    diff = _maxdiff(cached, io["gen_llm_hidden_image"])
    print(f"harmon_tiny gen_llm_hidden_image (prefix cache): max abs diff {diff:.3g}")
    assert diff <= TOL
    assert isinstance(prefix, KVCache)
