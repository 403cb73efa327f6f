"""Harmon / MAR parity against the official PyTorch code (fixture folder, see its README).

The model is rebuilt from the fixture's config.json and loaded through `convert` (the code users
run); every reference array of io.npz is reproduced (inputs and recorded random draws are fed
back through the real injection points) and compared:

* max |diff| <= 1e-4 for activations, losses and logits;
* max |diff| <= 1e-4 * max|ref| for the sampled latents that reach ~1e4 (README section
  "Magnitudes"), and for ddpm_mean / pred_xstart / sample the rows not at the noisiest step must
  also meet the absolute bound;
* exact equality for ids, masks, positions and timestep maps; schedules to 1e-12 relative.

Fixture folder: $UNIFIED_MM_HARMON_FIXTURES, else tests/data/harmon_tiny, else
../shared/fixtures/harmon_tiny. Every dimension and grid is read from config.json and the arrays.
Run with `pytest -s` to see the per-array table (also written under the pytest tmp dir).
"""

from __future__ import annotations

import json
import os
import pathlib
import pickle
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import unified_mm  # noqa: F401  (nnx.use_eager_sharding(False))
from unified_mm.models.harmon import convert, sampling
from unified_mm.models.harmon import diffusion as gd
from unified_mm.models.harmon.harmon import HarmonConfig
from unified_mm.models.harmon.mar import mask_by_order, num_masked_tokens, resize_pos_embed
from unified_mm.models.llm.qwen2 import default_positions

pytestmark = pytest.mark.parity

_HERE = pathlib.Path(__file__).resolve().parent


def _fixture_dir() -> pathlib.Path | None:
    env = os.environ.get("UNIFIED_MM_HARMON_FIXTURES")
    candidates = [pathlib.Path(env)] if env else []
    candidates += [
        _HERE / "data" / "harmon_tiny",
        _HERE.parent.parent / "shared" / "fixtures" / "harmon_tiny",
    ]
    for c in candidates:
        if (c / "io.npz").exists() and (c / "config.json").exists():
            return c
    return None


FIXTURE = _fixture_dir()
if FIXTURE is None:
    print("test_harmon_parity: no harmon fixture folder found (set UNIFIED_MM_HARMON_FIXTURES)")
    pytest.skip("no harmon fixture folder found", allow_module_level=True)

IO_NAMES = sorted(np.load(FIXTURE / "io.npz").files)
TOL = 1e-4
# Arrays fed in (INPUT / INJECTED / RECORDED draws), not compared.
INPUT_RE = re.compile(
    r"^(image|mask_orders|mask_ratio|und_input_ids|gen_attention_mask|gen_input_ids"
    r"|ddpm_(c|noise|t|temperature|x)|dl_(cfg|net)_(c|scale|t|x)|dl_sample_(init_noise|step_noise|z)"
    r"|loss_(noise|t)|t2i_(attention_mask|input_ids|orders_drawn)|t2i_s\d+_(init|step)_noise"
    r"|mar_cls_(labels|orders|tokens)|mar_sample_(labels|orders_drawn)"
    r"|mar_sample_s\d+_(init|step)_noise|mar_train_(labels|latents|noise|orders|t))$"
)
# ~1e4 sampled latents: tolerance relative to the array's max |x| (README "Magnitudes").
RELATIVE_RE = re.compile(
    r"(_sampled|^t2i_final_tokens|^dl_sample_out|^mar_sample_tokens|^t2i_s\d+_tokens_in"
    r"|^ddpm_(mean|pred_xstart|sample))$"
)
EXACT_RE = re.compile(
    r"(_mask|_mask_in|^mask|_ids|_timestep_map|^ddpm_t_net|^gen_position_ids|^loss_row_mask)$"
)
OUTPUTS = [n for n in IO_NAMES if not INPUT_RE.match(n)]
TABLE: dict[str, tuple[float, float, str]] = {}


def _md(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, f"shape {a.shape} != reference {b.shape}"
    return float(np.max(np.abs(a - b))) if a.size else 0.0


def _nchw(x) -> np.ndarray:
    return np.asarray(x).transpose(0, 3, 1, 2)


def _draws(io, prefix: str, plan: sampling.ARPlan, s: sampling.SampleSettings, batch: int, orders):
    """Official recorded draws -> the sampler's ARDraws layout ([B or R, K] padded slots)."""
    k, c = plan.max_pred, io[f"{prefix}_s0_init_noise"].shape[-1]
    steps = io[f"{prefix}_s0_step_noise"].shape[0]
    rows = 2 * batch if s.use_cfg else batch
    init = np.zeros((s.num_iter, batch if s.use_cfg else rows, k, c), np.float32)
    step = np.zeros((s.num_iter, steps, rows, k, c), np.float32)
    for i in range(s.num_iter):
        p = int(plan.pred_counts[i])
        init[i, :, :p] = io[f"{prefix}_s{i}_init_noise"].reshape(init.shape[1], p, c)
        step[i, :, :, :p] = io[f"{prefix}_s{i}_step_noise"].reshape(steps, rows, p, c)
    return sampling.ARDraws(
        orders=jnp.asarray(orders[:batch]),
        init_noise=jnp.asarray(init),
        step_noise=jnp.asarray(step),
    )


def _settings(section: dict, image_shape, segments: int = 1) -> sampling.SampleSettings:
    return sampling.SampleSettings(
        num_iter=int(section["num_iter"]),
        cfg=float(section["cfg"]),
        cfg_schedule=section["cfg_schedule"],
        temperature=float(section["temperature"]),
        image_shape=tuple(int(v) for v in image_shape),
        segments=min(segments, int(section["num_iter"])),
    )


def _trace_arrays(io, prefix: str, out: dict, plan, s, ours: dict) -> None:
    """Per-AR-step trace of the real sampler, un-padded into the official layouts."""
    tr = jax.tree.map(np.asarray, out["trace"])
    for i in range(s.num_iter):
        p = int(plan.pred_counts[i])
        rows = tr["dl_z"].shape[1]
        # Every row predicts the same positions count; padded slots are the tail.
        assert (tr["slot_valid"][i].sum(axis=1) == p).all()
        ours[f"{prefix}_s{i}_dl_z"] = tr["dl_z"][i][:, :p].reshape(rows * p, -1)
        ours[f"{prefix}_s{i}_sampled"] = tr["sampled"][i][:, :p].reshape(rows * p, -1)
        ours[f"{prefix}_s{i}_mask_in"] = tr["mask_in"][i]
        ours[f"{prefix}_s{i}_tokens_in"] = tr["tokens_in"][i]
        ours[f"{prefix}_s{i}_z"] = tr["z"][i]
        ref_name = f"{prefix}_s{i}_x_enc"
        if ref_name in io:
            n_real = io[ref_name].shape[1]
            valid = tr["x_enc_valid"][i]
            assert valid[:, :n_real].all() and not valid[:, n_real:].any(), "x_enc padding layout"
            ours[ref_name] = tr["x_enc"][i][:, :n_real]
    ours[f"{prefix}_cfg_per_step"] = tr["cfg"]


@pytest.fixture(scope="module")
def setup():
    cfg_json = json.loads((FIXTURE / "config.json").read_text())
    cfg = HarmonConfig.from_fixture_json(cfg_json, dtype="float32")
    model = convert.load_official(FIXTURE / "harmon.safetensors", FIXTURE / "vae.safetensors", cfg)
    io = dict(np.load(FIXTURE / "io.npz"))
    return cfg_json, cfg, model, io


@pytest.fixture(scope="module")
def ours(setup) -> dict[str, np.ndarray]:
    """Every compared array, computed once (one compile per function)."""
    cfg_json, cfg, model, io = setup
    out: dict[str, np.ndarray] = {}
    image = jnp.asarray(io["image"].transpose(0, 2, 3, 1))
    tokens_ref = jnp.asarray(io["tokens"])
    b, h, w, c = tokens_ref.shape
    ll = h * w
    ratio = float(io["mask_ratio"])

    # (a) VAE and (b) tokens.
    def vae_fn(m, x):
        post = m.vae.encode(x)
        return post.mean, post.logvar, m.vae.decode(post.mean), m.encode(x)

    mean, logvar, dec, toks = nnx.jit(vae_fn)(model, image)
    out["vae_posterior_mean"], out["vae_posterior_logvar"] = _nchw(mean), _nchw(logvar)
    dec_ref = nnx.jit(lambda m, z: m.vae.decode(z))(
        model, jnp.asarray(io["vae_posterior_mean"].transpose(0, 2, 3, 1))
    )
    out["vae_decode_of_mean"] = _nchw(dec_ref)
    assert _md(_nchw(dec), io["vae_decode_of_mean"]) < 10 * TOL  # our own chain, end to end
    out["tokens"] = np.asarray(toks)

    # (c) masking + MAR encoder + proj_in; padded to L visible rows (exercises the key mask).
    mask = mask_by_order(jnp.asarray(io["mask_orders"]), num_masked_tokens(ratio, ll, 0.0))
    out["mask"] = np.asarray(mask)
    feat_fn = nnx.jit(lambda m, t, mk: m.extract_visual_feature(t, mk, max_visible=ll))
    feat = feat_fn(model, tokens_ref, mask)
    n_real = io["enc_x_enc"].shape[1]
    assert np.asarray(feat.valid)[:, :n_real].all() and not np.asarray(feat.valid)[:, n_real:].any()
    out["enc_x_enc"] = np.asarray(feat.x_enc)[:, :n_real]
    zv = np.asarray(feat.z_valid)
    out["enc_z_enc"] = np.stack([np.asarray(feat.z_enc)[i][zv[i]] for i in range(b)])
    und = feat_fn(model, tokens_ref, jnp.zeros((b, ll), jnp.float32))
    out["und_x_enc"], out["und_z_enc"] = np.asarray(und.x_enc), np.asarray(und.z_enc)

    # (d) understanding: splice, logits, greedy decoding.
    und_ids = jnp.asarray(io["und_input_ids"])
    embeds = nnx.jit(lambda m, x, ids: m.understanding_embeds(x, ids))(model, image, und_ids)
    out["und_inputs_embeds"] = np.asarray(embeds)

    def logits_fn(llm, e):
        hidden, _ = llm(e)
        return llm.logits(hidden)

    out["und_logits"] = np.asarray(
        nnx.jit(logits_fn)(model.llm, jnp.asarray(io["und_inputs_embeds"]))
    )
    n_new = io["und_generated_ids"].shape[1]
    gen_ids, gen_logits = nnx.jit(sampling.image_to_text, static_argnames=("max_new_tokens",))(
        model, image, und_ids, max_new_tokens=n_new
    )
    out["und_generated_ids"], out["und_generated_logits"] = (
        np.asarray(gen_ids),
        np.asarray(gen_logits),
    )

    # (e) generation training path (padded visible rows) and (f) its loss.
    gen_ids_in = jnp.asarray(io["gen_input_ids"])
    gen_am = jnp.asarray(io["gen_attention_mask"])

    def gen_fn(m, t, mk, ids, am, lt, ln):
        x_enc, valid, hidden = m.forward_mae_encoder(
            t, mk, input_ids=ids, attention_mask=am, max_visible=ll, return_hidden=True
        )
        z = m.forward_mae_decoder(x_enc, mk, image_shape=(h, w))
        f = m.extract_visual_feature(t, mk, max_visible=ll)
        pos = default_positions(jnp.concatenate([am.astype(bool), f.z_valid], axis=1))
        loss, terms = m.mar.forward_loss(z, t.reshape(b, ll, c), mk, t=lt, noise=ln)
        return x_enc, valid, hidden, z, pos, f.z_valid, loss, terms

    x_enc, valid, hidden, z, pos, zvalid, loss, terms = nnx.jit(gen_fn)(
        model,
        tokens_ref,
        mask,
        gen_ids_in,
        gen_am,
        jnp.asarray(io["loss_t"]),
        jnp.asarray(io["loss_noise"]),
    )
    n_real = io["gen_x_enc"].shape[1]
    assert np.asarray(valid)[:, :n_real].all() and not np.asarray(valid)[:, n_real:].any()
    out["gen_x_enc"], out["gen_z"] = np.asarray(x_enc)[:, :n_real], np.asarray(z)
    keep = np.concatenate([np.ones(gen_am.shape, bool), np.asarray(zvalid)], axis=1)
    out["gen_position_ids"] = np.stack([np.asarray(pos)[i][keep[i]] for i in range(b)])
    out["gen_llm_hidden_image"] = np.stack(
        [np.asarray(hidden)[i][np.asarray(zvalid)[i]] for i in range(b)]
    )
    out["loss"], out["loss_row"] = np.asarray(loss), np.asarray(terms["loss"])
    out["loss_row_mse"], out["loss_row_vb"] = np.asarray(terms["mse"]), np.asarray(terms["vb"])
    out["loss_row_mask"] = np.asarray(terms["row_mask"])

    # (f) diffusion head: network, CFG forward, one DDPM step, sampling from recorded noise.
    dl = model.mar.diffloss
    sched = cfg.mar.diffloss.gen_schedule
    j = {k: jnp.asarray(v) for k, v in io.items() if k.startswith(("dl_", "ddpm_"))}
    out["dl_net_out"] = np.asarray(
        nnx.jit(lambda d, x, t, cc: d.net(x, t, cc))(
            dl, j["dl_net_x"], j["dl_net_t"], j["dl_net_c"]
        )
    )
    out["dl_cfg_out"] = np.asarray(
        nnx.jit(lambda d, x, t, cc, s: d.net.forward_with_cfg(x, t, cc, s))(
            dl, j["dl_cfg_x"], j["dl_cfg_t"], j["dl_cfg_c"], j["dl_cfg_scale"]
        )
    )

    def ddpm_fn(d, x, t, cc, noise, temp):
        t_net = jnp.asarray(sched.timestep_map)[t]
        mo = d.net(x, t_net, cc)
        return t_net, mo, gd.p_sample(sched, mo, x, t, noise, temp)

    t_net, mo, step = nnx.jit(ddpm_fn)(
        dl, j["ddpm_x"], j["ddpm_t"], j["ddpm_c"], j["ddpm_noise"], j["ddpm_temperature"]
    )
    out["ddpm_t_net"], out["ddpm_model_out"] = np.asarray(t_net), np.asarray(mo)
    for k in ("mean", "log_variance", "pred_xstart", "sample"):
        out[f"ddpm_{k}"] = np.asarray(step[k])
    out["dl_sample_out"] = np.asarray(
        nnx.jit(
            lambda d, zz, n0, ns: d.sample(
                zz, n0, ns, temperature=float(cfg_json["dl_sample_temperature"])
            )
        )(dl, j["dl_sample_z"], j["dl_sample_init_noise"], j["dl_sample_step_noise"])
    )

    # (g) end-to-end text-to-image through the real sampler with replayed draws.
    t2i_shape = io["t2i_final_tokens"].shape[1:3]
    s = _settings(cfg_json["t2i"], t2i_shape)
    plan = sampling.ARPlan.make(int(np.prod(t2i_shape)), s)
    bt = int(cfg_json["t2i"]["batch"])
    draws = _draws(io, "t2i", plan, s, bt, io["t2i_orders_drawn"])
    res = nnx.jit(sampling.sample_t2i, static_argnames=("settings", "trace"))(
        model,
        jnp.asarray(io["t2i_input_ids"]),
        jnp.asarray(io["t2i_attention_mask"]),
        settings=s,
        draws=draws,
        trace=True,
    )
    _trace_arrays(io, "t2i", res, plan, s, out)
    out["t2i_final_tokens"], out["t2i_image"] = np.asarray(res["tokens"]), _nchw(res["images"])

    # (h) LTH14 class-conditional MAR (native learned grid).
    g0 = (cfg.mar.seq_h, cfg.mar.seq_w)
    l0 = g0[0] * g0[1]
    cls_mask = mask_by_order(jnp.asarray(io["mar_cls_orders"]), num_masked_tokens(ratio, l0, 0.0))
    out["mar_cls_mask"] = np.asarray(cls_mask)

    def cls_fn(mar, t, mk, labels):
        xe, v = mar.forward_mae_encoder(
            t, mk, mar.class_emb(labels), image_shape=g0, max_visible=l0
        )
        return xe, v, mar.forward_mae_decoder(xe, mk, image_shape=g0)

    xe, v, zc = nnx.jit(cls_fn)(
        model.mar, jnp.asarray(io["mar_cls_tokens"]), cls_mask, jnp.asarray(io["mar_cls_labels"])
    )
    n_real = io["mar_cls_x_enc"].shape[1]
    assert np.asarray(v)[:, :n_real].all() and not np.asarray(v)[:, n_real:].any()
    out["mar_cls_x_enc"], out["mar_cls_z"] = np.asarray(xe)[:, :n_real], np.asarray(zc)

    def train_fn(mar, lat, labels, orders, t, noise):
        return mar.class_conditional_loss(
            lat,
            labels,
            jax.random.key(0),
            deterministic=True,
            orders=orders,
            mask_ratio=ratio,
            t=t,
            noise=noise,
        )

    lat = jnp.asarray(io["mar_train_latents"].transpose(0, 2, 3, 1))
    tl, tt = nnx.jit(train_fn)(
        model.mar,
        lat,
        jnp.asarray(io["mar_train_labels"]),
        jnp.asarray(io["mar_train_orders"]),
        jnp.asarray(io["mar_train_t"]),
        jnp.asarray(io["mar_train_noise"]),
    )
    out["mar_train_loss"], out["mar_train_loss_row"] = np.asarray(tl), np.asarray(tt["loss"])
    out["mar_train_mask"] = np.asarray(tt["mask"])

    # Two static segments here (one for t2i): both AR-loop layouts are held to the reference.
    ms = _settings(cfg_json["mar_sample"], io["mar_sample_tokens"].shape[2:4], segments=2)
    mplan = sampling.ARPlan.make(int(np.prod(ms.image_shape)), ms)
    mdraws = _draws(
        io,
        "mar_sample",
        mplan,
        ms,
        int(cfg_json["mar_sample"]["batch"]),
        io["mar_sample_orders_drawn"],
    )
    mres = nnx.jit(sampling.sample_mar, static_argnames=("settings", "trace"))(
        model.mar, jnp.asarray(io["mar_sample_labels"]), settings=ms, draws=mdraws, trace=True
    )
    _trace_arrays(io, "mar_sample", mres, mplan, ms, out)
    out["mar_sample_tokens"] = _nchw(mres["tokens"])

    # (i) schedules (float64 tables).
    for tag, sch in (("train", cfg.mar.diffloss.train_schedule), ("gen", sched)):
        for name in io:
            if name.startswith(f"sched_{tag}_"):
                out[name] = getattr(sch, name[len(f"sched_{tag}_") :])
    return out


@pytest.mark.parametrize("name", OUTPUTS)
def test_array_parity(name, ours, setup):
    io = setup[3]
    ref = io[name]
    assert name in ours, f"{name}: no computation reproduces this reference array"
    got = ours[name]
    diff = _md(got, ref)
    if EXACT_RE.search(name):
        tol, kind = 0.0, "exact"
    elif name.startswith("sched_"):
        tol, kind = 1e-12 * max(1.0, float(np.abs(ref).max())), "rel 1e-12"
    elif RELATIVE_RE.search(name):
        tol, kind = TOL * float(np.abs(ref).max()), "rel"
    else:
        tol, kind = TOL, "abs"
    TABLE[name] = (diff, float(np.abs(ref).max()) if ref.size else 0.0, kind)
    print(f"{name:42s} max|diff| {diff:.3e}  max|ref| {TABLE[name][1]:.3e}  ({kind} tol {tol:.1e})")
    assert diff <= tol, f"{name}: max |diff| {diff:.3e} > {tol:.3e}"
    if name in ("ddpm_mean", "ddpm_pred_xstart", "ddpm_sample"):
        # Rows not at the noisiest respaced step are O(1): hold them to the absolute bound.
        t = io["ddpm_t"]
        rows = t != t.max()
        assert _md(got[rows], ref[rows]) <= TOL, f"{name}: O(1) rows exceed {TOL}"


@pytest.fixture(scope="module", autouse=True)
def parity_table(tmp_path_factory):
    """Summary table of the per-array differences, printed (-s) and written at module teardown."""
    yield TABLE
    if not TABLE:
        return
    lines = [f"{'array':42s} {'max|diff|':>10s} {'max|ref|':>10s} kind"]
    lines += [f"{k:42s} {d:10.3e} {r:10.3e} {kind}" for k, (d, r, kind) in sorted(TABLE.items())]
    path = tmp_path_factory.mktemp("harmon_parity") / "parity_table.txt"
    path.write_text("\n".join(lines) + "\n")
    print("\n" + "\n".join(lines) + f"\n(table written to {path})")


def test_every_reference_array_is_compared(ours):
    missing = [n for n in OUTPUTS if n not in ours]
    assert not missing, f"reference arrays without a computation: {missing}"
    assert len(OUTPUTS) > 0.5 * len(IO_NAMES), "too many arrays treated as inputs"


# ----------------------------------------------------------------------------------------------
# Converter checks on the fixture weights


def test_official_round_trip_is_bit_exact(setup):
    cfg = setup[1]
    sd = convert.load_torch_file(FIXTURE / "harmon.safetensors")
    vae_sd = convert.load_torch_file(FIXTURE / "vae.safetensors")
    params = convert.harmon_params_from_official(sd, vae_sd, cfg)
    back, back_vae = convert.official_from_harmon_params(params, cfg)
    assert set(back) == set(sd), f"key sets differ: {sorted(set(back) ^ set(sd))}"
    assert set(back_vae) == set(vae_sd), (
        f"VAE key sets differ: {sorted(set(back_vae) ^ set(vae_sd))}"
    )
    for k in sd:
        assert back[k].dtype == np.float32 and back[k].shape == sd[k].shape, k
        assert np.array_equal(back[k], sd[k]), k
    for k in vae_sd:
        assert np.array_equal(back_vae[k], vae_sd[k]), k
    # The model holds exactly these parameters.
    state = nnx.to_pure_dict(nnx.state(setup[2], nnx.Param))
    mar_qkv = np.asarray(state["mar"]["encoder_blocks"]["attn"]["qkv"]["kernel"][0])
    assert np.array_equal(mar_qkv, sd["mar.encoder_blocks.0.attn.qkv.weight"].T)


def test_converter_reports_every_bad_key(setup):
    cfg = setup[1]
    sd = dict(convert.load_torch_file(FIXTURE / "harmon.safetensors"))
    vae_sd = dict(convert.load_torch_file(FIXTURE / "vae.safetensors"))
    del sd["mar.z_proj.bias"]
    del sd["llm.model.norm.weight"]
    sd["mar.not_a_param"] = np.zeros(3, np.float32)
    sd["proj_in.0.weight"] = np.zeros((5, 5), np.float32)
    del vae_sd["decoder.conv_out.bias"]
    with pytest.raises(ValueError) as err:
        convert.harmon_params_from_official(sd, vae_sd, cfg)
    msg = str(err.value)
    for needle in (
        "mar.z_proj.bias",
        "llm.model.norm.weight",
        "mar.not_a_param",
        "proj_in.0.weight (5, 5)",
        "vae:decoder.conv_out.bias",
    ):
        assert needle in msg, f"{needle!r} not named in: {msg}"
    assert "\n" not in msg


def test_untied_lm_head_copy_is_rejected(setup):
    cfg = setup[1]
    sd = dict(convert.load_torch_file(FIXTURE / "harmon.safetensors"))
    sd["llm.lm_head.weight"] = sd["llm.lm_head.weight"] + 1.0
    with pytest.raises(ValueError, match="llm.lm_head.weight"):
        convert.harmon_params_from_official(
            sd, convert.load_torch_file(FIXTURE / "vae.safetensors"), cfg
        )


# ----------------------------------------------------------------------------------------------
# Positional-embedding resize and checkpoint-file safety


@pytest.mark.parametrize("dst", [(8, 8), (3, 5), (4, 4)])
def test_pos_embed_resize_matches_torch(dst):
    torch = pytest.importorskip("torch", reason="needs torch (the 'convert' extra)")
    rng = np.random.default_rng(0)
    pe = rng.standard_normal((16, 7)).astype(np.float32)
    ours = np.asarray(resize_pos_embed(jnp.asarray(pe), (4, 4), dst))
    grid = torch.from_numpy(pe.reshape(1, 4, 4, 7)).permute(0, 3, 1, 2)
    ref = torch.nn.functional.interpolate(grid, size=dst, mode="bilinear", align_corners=False)
    ref = ref.permute(0, 2, 3, 1).reshape(dst[0] * dst[1], 7).numpy()
    diff = float(np.abs(ours - ref).max())
    print(f"pos-embed 4x4 -> {dst}: max |diff| {diff:.2e}")
    assert diff < 1e-6


class _Payload:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_load_torch_file_refuses_code_execution(tmp_path: pathlib.Path):
    torch = pytest.importorskip("torch", reason="needs torch (the 'convert' extra)")
    marker = tmp_path / "pwned"
    legacy = tmp_path / "evil_legacy.pth"
    legacy.write_bytes(pickle.dumps({"w": _Payload(str(marker))}, protocol=2))
    zipped = tmp_path / "evil_zip.pth"
    torch.save({"w": _Payload(str(marker))}, zipped)
    for path in (legacy, zipped):
        with pytest.raises(ValueError, match="refusing to load"):
            convert.load_torch_file(path)
    assert not marker.exists(), "the pickle payload was executed"


def test_load_torch_file_reads_state_dicts(tmp_path: pathlib.Path):
    torch = pytest.importorskip("torch", reason="needs torch (the 'convert' extra)")
    sd = {
        "a.weight": torch.arange(6, dtype=torch.float32).reshape(2, 3),
        "b": torch.ones(2, dtype=torch.bfloat16),
    }
    torch.save({"model": sd, "epoch": 3}, tmp_path / "kl16.ckpt")
    torch.save(sd, tmp_path / "plain.pth")
    for name in ("kl16.ckpt", "plain.pth"):
        out = convert.load_torch_file(tmp_path / name)
        assert set(out) == {"a.weight", "b"}
        np.testing.assert_array_equal(out["a.weight"], np.arange(6, dtype=np.float32).reshape(2, 3))
        assert out["b"].dtype == np.float32 and (out["b"] == 1).all()
    with pytest.raises(ValueError, match="does not exist"):
        convert.load_torch_file(tmp_path / "missing.pth")
