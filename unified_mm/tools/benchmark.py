"""Benchmarks: train-step time, sampling latency, input-pipeline throughput and MFU.

    # the four fixed CPU workloads of ../shared/bench (fixture config.json format, float32):
    python -m unified_mm.tools.benchmark --bench-config ../shared/bench/harmon_bench_config.json
    # a training config: every stage's step, the input pipeline, sampling:
    python -m unified_mm.tools.benchmark --config configs/shapes_harmon.py
    # a paper config at reduced depth on a GPU/TPU (MFU against the chip's peak):
    python -m unified_mm.tools.benchmark --config configs/harmon_1p5b.py --max_layers 2

Both modes print one JSON line of figures on stdout (progress goes to stderr). Times are taken
after compilation: the median and minimum of ``--iters`` calls, each synchronised with
``block_until_ready``. Every step is the trainer's own (``train/step.py``, built with the same
layout and optimizer), so what is timed is what trains. ``--threads N`` pins the process to N
CPUs before XLA starts its thread pool.

Bench mode runs, at exactly the dimensions and settings of the file's ``bench`` section: the
text-to-image and image-to-text training steps (forward, backward, AdamW update with the MAR
weight-decay mask, no clipping; dropout on; the text-to-image mask ratio fixed at the given
value), text-to-image sampling (prefill, AR steps with CFG, DDPM head, VAE decode of all rows)
and image-to-text greedy decoding (VAE encode, MAR encoder, splice, prefill, decode). The GFLOP
per call count the workload as specified (the official token counts), not this implementation's
static padding, so the achieved GFLOP/s compare across implementations.
"""

from __future__ import annotations

import json
import os
import sys
import time

from absl import app, flags
from ml_collections import config_flags

from unified_mm.models.flops_common import xla_flops
from unified_mm.tools.bench_timing import (
    CompileCounter,
    cpu_fp32_matmul_peak,
    time_calls,
    with_rates,
)

WORKLOADS = ("t2i_train", "i2t_train", "t2i_sample", "i2t_decode")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- analytic FLOPs
def _vit(cfg, rows: int, which: str) -> float:
    from unified_mm.models.flops_common import vit_block_flops

    m = cfg.mar
    width = getattr(m, f"{which}_embed_dim")
    depth = getattr(m, f"{which}_depth")
    return depth * vit_block_flops(rows, width, int(width * m.mlp_ratio))


def _mar_encoder(cfg, rows: int) -> float:
    # z_proj on the token rows, then the blocks over buffers + visible tokens
    return (
        _vit(cfg, rows, "encoder")
        + 2.0 * rows * cfg.mar.token_embed_dim * cfg.mar.encoder_embed_dim
    )


def _mar_decoder(cfg, rows: int) -> float:
    return (
        _vit(cfg, rows, "decoder")
        + 2.0 * rows * cfg.mar.encoder_embed_dim * cfg.mar.decoder_embed_dim
    )


def _proj(cfg, rows: int, *, out: bool) -> float:
    de, h = cfg.mar.encoder_embed_dim, cfg.llm.hidden_size
    hin, hout = cfg.proj_in_hidden or h, cfg.proj_out_hidden or h
    flops = 2.0 * rows * (de * hin + hin * h)
    if out:
        flops += 2.0 * rows * (h * hout + hout * de)
    return flops


def _llm(cfg, new: int, prefix: int = 0) -> float:
    """``new`` tokens attending to ``prefix`` cached keys plus themselves causally."""
    from unified_mm.models.flops_common import qwen2_layer_flops

    c = cfg.llm
    q = c.num_attention_heads * c.head_dim
    dense = qwen2_layer_flops(new, c) - 4.0 * new * new * q / 2
    attention = 4.0 * new * (prefix + new / 2) * q
    return c.num_hidden_layers * (dense + attention)


def _logits(cfg, rows: int) -> float:
    return 2.0 * rows * cfg.llm.hidden_size * cfg.llm.vocab_size


# ----------------------------------------------------------------------------- bench mode
def load_bench_config(path: str, *, shrink: bool = False):
    """(bench section, HarmonConfig) from a fixture-format config.json."""
    from unified_mm.models.harmon.harmon import HarmonConfig

    with open(path) as f:
        d = json.load(f)
    if "bench" not in d:
        raise ValueError(f"{path} has no 'bench' section (expected ../shared/bench format)")
    b = d["bench"]
    if b.get("dtype", "float32") != "float32":
        raise ValueError(f"{path}: bench dtype {b.get('dtype')!r}; this mode measures float32")
    if shrink:
        d["mar"].update(
            encoder_embed_dim=32,
            decoder_embed_dim=32,
            encoder_depth=1,
            decoder_depth=1,
            encoder_num_heads=2,
            decoder_num_heads=2,
            diffloss_w=32,
            diffloss_d=1,
        )
        d["llm"].update(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
        )
        d["vae"].update(ch=4, norm_num_groups=2)
        d.setdefault("harmon", {}).update(proj_in=[32, 32, 32], proj_out=[32, 32, 32])
    cfg = HarmonConfig.from_fixture_json(
        d,
        dtype="float32",
        remat=bool(b.get("grad_checkpointing", False)),
        # shrunk: a pixel-patch tokenizer instead of the conv VAE keeps test compiles short
        tokenizer="pixel" if shrink else "kl16",
        pixel_patch=int(d["vae"].get("stride", 16)) if shrink else None,
    )
    return b, cfg, int(d.get("seed", 0))


def _bench_family(model_cfg, mask_ratio: float):
    import ml_collections

    from unified_mm.families.harmon import HarmonFamily
    from unified_mm.train.family import ModelFamily

    class BenchHarmon(HarmonFamily):
        """HarmonFamily without a data pipeline, the t2i mask ratio fixed (bench rule)."""

        t2i_mask_ratio = float(mask_ratio)

        def __init__(self):
            ModelFamily.__init__(self, ml_collections.ConfigDict())
            self.model_cfg = model_cfg

    return BenchHarmon()


def _stage(name: str, task_batch: dict, image_size: int, lr: float, trainable):
    """A one-row stage table read by the trainer's own parser (constant LR, no warm-up)."""
    import ml_collections

    from unified_mm.config.base import stage
    from unified_mm.train.stages import stages_from_config

    table = ml_collections.ConfigDict({"stage_order": (name,)})
    table.stages = ml_collections.ConfigDict(
        {
            name: stage(
                steps=10**6,
                trainable=tuple(trainable),
                image_size=image_size,
                task_batch=dict(task_batch),
                lr=lr,
            )
        }
    )
    return stages_from_config(table)[0]


def trainer_step(
    family,
    stage,
    opt_cfg,
    mesh,
    rules,
    *,
    seed: int,
    ema_decay: float = 0.0,
    params=None,
    layout=None,
):
    """The trainer's jitted step and a fresh state for ``stage`` (as train.py builds them)."""
    import jax
    import jax.numpy as jnp

    from unified_mm.parallel.sharding import batch_sharding
    from unified_mm.train.init import assemble_state, init_params, model_layout, stage_layout
    from unified_mm.train.optimizer import make_optimizer
    from unified_mm.train.step import StepOptions, make_train_step

    layout = layout or model_layout(family, mesh, rules)
    if params is None:
        params = init_params(family, layout, mesh, rules, seed)
    use_ema = ema_decay > 0
    tx = make_optimizer(opt_cfg, stage, family.weight_decay_rule)
    sl = stage_layout(layout, stage, tx, mesh, use_ema=use_ema)
    # Copies: the step donates its state, and jit may forward unchanged inputs as outputs, so the
    # caller's params must not alias the state's buffers.
    state = assemble_state(
        layout,
        sl,
        stage,
        tx,
        mesh,
        params=jax.tree.map(jnp.copy, params),
        ema=jax.tree.map(jnp.copy, params) if use_ema else None,
        step=0,
        rng=jax.random.key_data(jax.random.key(seed + 1)),
    )
    step = jax.jit(
        make_train_step(family, sl.graphdef, stage, tx, StepOptions(ema_decay, ())),
        in_shardings=(sl.shardings, batch_sharding(mesh)),
        out_shardings=(sl.shardings, None),
        donate_argnums=0,
    )
    return layout, params, state, step


def _time_train(step, state, batch, iters, counter, mesh, rules) -> dict:
    """Times the jitted step; traced under the mesh and the logical-axis rules (see aot_compile)."""
    import jax
    from flax import nnx

    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        t0 = time.perf_counter()
        compiled = step.lower(state, batch).compile()
        compile_s = time.perf_counter() - t0
        holder = {"state": state}

        def call():
            holder["state"], metrics = compiled(holder["state"], batch)
            return metrics["loss"]

        r = time_calls(call, iters, counter)
    ma = compiled.memory_analysis()
    r["compile_s"] = compile_s
    # per device; what remat and batch-size choices trade against step time
    r["temp_bytes"] = float(ma.temp_size_in_bytes)
    r["argument_bytes"] = float(ma.argument_size_in_bytes)
    return r


def _padded_ids(rng, lens, length: int, vocab: int, pad: int):
    """Right-padded random ids (host numpy: no device work before the timed programs)."""
    import numpy as np

    ids = rng.integers(0, vocab - 2, (len(lens), length), dtype=np.int32)
    valid = np.arange(length)[None, :] < np.asarray(lens)[:, None]
    return np.where(valid, ids, pad).astype(np.int32), valid.astype(np.int32)


def _greedy_decoder(graphdef, max_new_tokens: int):
    """Jitted greedy image-to-text decoding (params, images, prompt ids) -> token ids."""
    import jax
    from flax import nnx

    from unified_mm.models.harmon import sampling

    @jax.jit
    def decode(params, images, prompt_ids):
        model = nnx.merge(graphdef, params)
        return sampling.image_to_text(
            model, images, prompt_ids, None, max_new_tokens=max_new_tokens
        )[0]

    return decode


def run_bench(path: str, iters: int, workloads, *, shrink: bool = False) -> dict:
    import jax
    import jax.numpy as jnp
    import ml_collections
    import numpy as np
    from flax import nnx

    from unified_mm.config.base import DEFAULT_SHARDING_RULES
    from unified_mm.models.harmon import sampling
    from unified_mm.models.harmon.flops import diffloss_row_flops
    from unified_mm.parallel.mesh import build_mesh
    from unified_mm.parallel.sharding import host_batch_to_global, rules_from_config
    from unified_mm.train.init import init_params, model_layout

    b, cfg, seed = load_bench_config(path, shrink=shrink)
    unknown = [w for w in workloads if w not in WORKLOADS]
    if unknown:
        raise ValueError(f"unknown workload(s) {unknown}")
    counter = CompileCounter.get()
    device = jax.local_devices()[0]
    mesh = build_mesh(
        ml_collections.ConfigDict(dict(data=1, fsdp=1, tensor=1, num_slices=1)), [device]
    )
    rules = rules_from_config(DEFAULT_SHARDING_RULES)
    o = b["optimizer"]
    opt_cfg = ml_collections.ConfigDict(
        dict(
            b1=o["betas"][0],
            b2=o["betas"][1],
            eps=1e-8,
            weight_decay=o["weight_decay"],
            grad_clip=0.0,
            mu_dtype="float32",
        )
    )
    vocab, pad, img_id = cfg.llm.vocab_size, cfg.pad_token_id, cfg.image_token_id
    size = cfg.image_size
    rng = np.random.default_rng(seed + 1)  # every model input is drawn from seed + 1
    family = _bench_family(cfg, float(b["t2i_train"]["mask_ratio"]))
    trainable = ("mar_encoder", "mar_decoder", "diffloss", "projectors", "llm")  # VAE frozen
    h, w = cfg.latent_grid()
    ll, nb = h * w, cfg.mar.buffer_size
    out: dict = {
        "benchmark": "harmon_bench",
        "config": os.path.abspath(path),
        "dtype": "float32",
        "shrunk": shrink,
        "jax": jax.__version__,
        "device": device.device_kind,
        "cpus": len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
    }
    layout = model_layout(family, mesh, rules)
    if shrink:
        # Tests only: constant weights need no compiled initialiser (the values do not change
        # the work done); real runs initialise exactly as the trainer does.
        params = jax.tree.map(
            lambda a, sh: jax.device_put(np.full(a.shape, 0.02, a.dtype), sh),
            layout.abstract_params,
            layout.param_shardings,
        )
    else:
        params = init_params(family, layout, mesh, rules, seed)

    def images(n):
        return rng.uniform(-1.0, 1.0, (n, size, size, 3)).astype(np.float32)

    def vae_encode_flops(n):
        model = nnx.merge(layout.graphdef, params)
        gd, st = nnx.split(model.vae)
        return xla_flops(lambda s, x: nnx.merge(gd, s).tokenize(x), st, images(n))

    def vae_decode_flops(n):
        model = nnx.merge(layout.graphdef, params)
        gd, st = nnx.split(model.vae)
        z = jnp.zeros((n, h, w, cfg.mar.token_embed_dim), jnp.float32)
        return xla_flops(lambda s, x: nnx.merge(gd, s).detokenize(x), st, z)

    # -- text-to-image training step
    if "t2i_train" in workloads:
        t = b["t2i_train"]
        n = int(t["batch"])
        stage = _stage("bench_t2i", {"t2i": n}, size, float(o["lr"]), trainable)
        _, _, state, step = trainer_step(
            family, stage, opt_cfg, mesh, rules, seed=seed, params=params, layout=layout
        )
        ids, mask = _padded_ids(rng, t["text_valid_lens"], int(t["text_len"]), vocab, pad)
        batch = host_batch_to_global(
            {"t2i": {"image": images(n), "input_ids": ids, "attention_mask": mask}}, mesh
        )
        log(f"t2i_train: batch {n}, text {t['text_len']}, mask ratio {t['mask_ratio']:.4f}")
        r = _time_train(step, state, batch, iters, counter, mesh, rules)
        enc, llm_t, dec = int(t["encoder_tokens"]), int(t["llm_tokens"]), int(t["decoder_tokens"])
        fwd = n * (
            _mar_encoder(cfg, enc)
            + _proj(cfg, enc, out=True)
            + _llm(cfg, llm_t)
            + _mar_decoder(cfg, dec)
        ) + int(t["diffloss_rows"]) * diffloss_row_flops(cfg)
        gflop = (3 * fwd + vae_encode_flops(n)) / 1e9
        out["t2i_train"] = with_rates(r, gflop, samples_per_s=n)
        del state, step

    # -- image-to-text training step
    if "i2t_train" in workloads:
        t = b["i2t_train"]
        n, p, a = int(t["batch"]), int(t["prompt_len"]), int(t["answer_len"])
        n_img = int(t["image_tokens"])
        if n_img != ll + nb:
            raise ValueError(f"i2t image_tokens {n_img} != latent tokens {ll} + buffers {nb}")
        stage = _stage("bench_i2t", {"i2t": n}, size, float(o["lr"]), trainable)
        _, _, state, step = trainer_step(
            family, stage, opt_cfg, mesh, rules, seed=seed, params=params, layout=layout
        )
        prompt = rng.integers(0, vocab - 2, (n, p), dtype=np.int32)
        answer = rng.integers(0, vocab - 2, (n, a), dtype=np.int32)
        ids = np.concatenate([prompt, np.full((n, n_img), img_id, np.int32), answer], axis=1)
        labels = np.concatenate([np.full((n, p + n_img), -100, np.int32), answer], axis=1)
        batch = host_batch_to_global(
            {
                "i2t": {
                    "image": images(n),
                    "input_ids": ids,
                    "attention_mask": np.ones_like(ids),
                    "labels": labels,
                }
            },
            mesh,
        )
        log(f"i2t_train: batch {n}, sequence {ids.shape[1]}")
        r = _time_train(step, state, batch, iters, counter, mesh, rules)
        seq = int(t["seq_len"])
        fwd = n * (
            _mar_encoder(cfg, n_img)
            + _proj(cfg, n_img, out=False)
            + _llm(cfg, seq)
            + _logits(cfg, seq)
        )
        gflop = (3 * fwd + vae_encode_flops(n)) / 1e9
        out["i2t_train"] = with_rates(r, gflop, samples_per_s=n)
        del state, step

    graphdef = layout.graphdef

    # -- text-to-image sampling
    if "t2i_sample" in workloads:
        t = b["t2i_sample"]
        n, text_len = int(t["images"]), int(t["text_len"])
        settings = sampling.SampleSettings(
            num_iter=int(t["num_iter"]),
            cfg=float(t["cfg"]),
            cfg_schedule=t["cfg_schedule"],
            temperature=float(t["temperature"]),
            image_shape=tuple(t["image_shape"]),
        )
        lens = list(b.get("text", {}).get("t2i_cond_lens", [text_len] * n))[:n]
        null_len = int(b.get("text", {}).get("t2i_null_len", 1))
        ids, mask = _padded_ids(rng, lens + [null_len] * n, text_len, vocab, pad)
        ddpm = cfg.mar.diffloss.gen_schedule.num_timesteps
        if ddpm != int(t["ddpm_steps"]):
            raise ValueError(f"config gives {ddpm} DDPM steps, bench says {t['ddpm_steps']}")

        @jax.jit
        def t2i(params, ids, mask, key):
            model = nnx.merge(graphdef, params)
            res = sampling.sample_t2i(model, ids, mask, settings=settings, key=key)
            # Harmon.decode decodes both CFG halves in the official sampler: same work here.
            return res["images"], model.decode(res["tokens"][n:])

        key = jax.random.key(seed + 1)
        log(
            f"t2i_sample: {n} images, cfg {settings.cfg}, {settings.num_iter} AR steps, {ddpm} DDPM"
        )
        r = time_calls(lambda: t2i(params, ids, mask, key), iters, counter)
        rows = 2 * n if settings.use_cfg else n
        plan = sampling.ARPlan.make(ll, settings)
        flops = rows * _llm(cfg, text_len)  # prefill
        for i in range(settings.num_iter):
            vis = ll - int(plan.counts[i])
            enc = nb + vis
            flops += rows * (
                _mar_encoder(cfg, enc)
                + _proj(cfg, enc, out=True)
                + _llm(cfg, enc, prefix=text_len)
                + _mar_decoder(cfg, nb + ll)
            )
            flops += ddpm * rows * int(plan.pred_counts[i]) * diffloss_row_flops(cfg)
        gflop = (flops + vae_decode_flops(rows)) / 1e9
        res = with_rates(r, gflop, images_per_s=n)
        res["seconds_per_image"] = r["median_s"] / n
        res["cache_entries"] = t2i._cache_size()
        out["t2i_sample"] = res

    # -- image-to-text decoding
    if "i2t_decode" in workloads:
        t = b["i2t_decode"]
        n, plen, new = int(t["batch"]), int(t["prompt_len"]), int(t["new_tokens"])
        text = b.get("text", {})
        pre = int(text.get("und_prefix", [3])[0])
        suf = plen - pre - (ll + nb)
        if suf < 0:
            raise ValueError(f"i2t prompt_len {plen} is shorter than the image span {ll + nb}")
        ids = np.concatenate(
            [
                rng.integers(0, vocab - 2, (n, pre), dtype=np.int32),
                np.full((n, ll + nb), img_id, np.int32),
                rng.integers(0, vocab - 2, (n, suf), dtype=np.int32),
            ],
            axis=1,
        )
        imgs = images(n)

        i2t = _greedy_decoder(graphdef, new)

        log(f"i2t_decode: batch {n}, prompt {plen}, {new} new tokens (greedy)")
        r = time_calls(lambda: i2t(params, imgs, ids), iters, counter)
        flops = n * (
            _mar_encoder(cfg, ll + nb)
            + _proj(cfg, ll + nb, out=False)
            + _llm(cfg, plen)
            + _logits(cfg, 1)
        )
        for j in range(1, new):  # each later token attends to the prompt and the earlier ones
            flops += n * (_llm(cfg, 1, prefix=plen + j - 1) + _logits(cfg, 1))
        gflop = (flops + vae_encode_flops(n)) / 1e9
        res = with_rates(r, gflop, tokens_per_s=n * new)
        res["cache_entries"] = i2t._cache_size()
        out["i2t_decode"] = res

    peak = cpu_fp32_matmul_peak((256,) if shrink else (512, 1024, 2048))
    out["cpu_fp32_matmul_peak_gflops"] = peak["gflops"]
    out["cpu_fp32_matmul_peak_n"] = peak["n"]
    return out


# ----------------------------------------------------------------------------- config mode
_DEPTH_KEYS = ("depth", "num_hidden_layers", "diffloss_d", "num_layers", "layers")


def cap_depths(node, max_layers: int) -> list[str]:
    """Caps every depth-like integer field under ``node`` (a ConfigDict) at ``max_layers``."""
    changed = []
    for key in list(node.keys()):
        value = node[key]
        if hasattr(value, "keys"):
            changed += [f"{key}.{c}" for c in cap_depths(value, max_layers)]
        elif (
            isinstance(value, int)
            and not isinstance(value, bool)
            and (key in _DEPTH_KEYS or key.endswith("_depth"))
            and value > max_layers
        ):
            node[key] = max_layers
            changed.append(key)
    return changed


def run_config(
    config, stages, iters: int, max_layers: int, pipeline_batches: int, sampling: bool = True
) -> dict:
    import jax

    from unified_mm import families
    from unified_mm.parallel.mesh import build_mesh
    from unified_mm.parallel.sharding import host_batch_to_global, rules_from_config
    from unified_mm.tools.aot_compile import portable_config
    from unified_mm.train import metrics as mt
    from unified_mm.train.stages import stages_from_config

    config = portable_config(config)  # unlocked; an absent tokenizer file is dropped
    out: dict = {
        "benchmark": "config",
        "jax": jax.__version__,
        "device": jax.local_devices()[0].device_kind,
        "devices": jax.device_count(),
    }
    if max_layers:
        out["capped"] = cap_depths(config.model, max_layers)
    counter = CompileCounter.get()
    family = families.build(config)
    all_stages = stages_from_config(config)
    names = list(stages) or [s.name for s in all_stages]
    mesh = build_mesh(config.mesh)
    rules = rules_from_config(config.sharding_rules)
    peak = mt.peak_tflops()
    layout = params = None
    out["stages"] = {}
    for stage in all_stages:
        if stage.name not in names:
            continue
        layout, params, state, step = trainer_step(
            family,
            stage,
            config.optimizer,
            mesh,
            rules,
            seed=int(config.seed),
            ema_decay=float(config.ema.decay),
            params=params,
            layout=layout,
        )
        it = family.make_train_iterator(
            stage,
            seed=int(config.seed) * 1000 + stage.index,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )
        batch = host_batch_to_global(next(it), mesh)
        log(f"[{stage.name}] train step, global batch {stage.global_batch} at {stage.image_size}px")
        r = _time_train(step, state, batch, iters, counter, mesh, rules)
        flops = family.flops_per_step(stage)
        r["examples_per_s"] = stage.global_batch / r["median_s"]
        r["model_tflop_per_step"] = flops / 1e12
        r["tflops_achieved_per_device"] = flops / r["median_s"] / mesh.size / 1e12
        u = mt.mfu(flops, r["median_s"], mesh.size, peak)
        if u is not None:
            r["mfu"] = u
        # Input pipeline: decoding, resizing, tokenizing, batching on this host. Batches buffered
        # while the step was timed are drained first, so this is the production rate.
        for _ in range(int(config.data.get("prefetch", 0)) + 2):
            next(it)
        t0 = time.perf_counter()
        for _ in range(pipeline_batches):
            next(it)
        dt = time.perf_counter() - t0
        host_rows = stage.global_batch // jax.process_count()
        r["pipeline_examples_per_s"] = pipeline_batches * host_rows / dt
        r["pipeline_vs_step"] = r["pipeline_examples_per_s"] / (host_rows / r["median_s"])
        getattr(it, "close", lambda: None)()
        out["stages"][stage.name] = r
        del state, step

    if sampling and config.family == "harmon" and params is not None:
        out.update(_config_sampling(family, layout, params, config, all_stages[-1], iters, counter))
    return out


def _config_sampling(family, layout, params, config, stage, iters, counter) -> dict:
    """Text-to-image latency per image and image-to-text tokens/s at the last stage's size."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from unified_mm.models.harmon import sampling

    cfg = family.model_cfg
    ev = config.eval
    size = stage.image_size
    grid = cfg.latent_grid(size)
    n, text_len, new = 4, int(config.data.max_text_len), 32
    settings = sampling.SampleSettings(
        num_iter=int(ev.num_iter),
        cfg=float(ev.cfg),
        cfg_schedule=str(ev.cfg_schedule),
        temperature=float(ev.temperature),
        image_shape=grid,
    )
    rows = 2 * n if settings.use_cfg else n
    key = jax.random.key(0)
    ids = jax.random.randint(key, (rows, text_len), 0, min(cfg.llm.vocab_size, 100), jnp.int32)
    mask = jnp.ones_like(ids)
    graphdef = layout.graphdef

    @jax.jit
    def t2i(params, ids, mask, key):
        model = nnx.merge(graphdef, params)
        return sampling.sample_t2i(model, ids, mask, settings=settings, key=key)["images"]

    log(f"t2i sampling: {n} images at {size}px, {settings.num_iter} AR steps")
    r = time_calls(lambda: t2i(params, ids, mask, key), iters, counter)
    r["seconds_per_image"] = r["median_s"] / n
    r["cache_entries"] = t2i._cache_size()
    n_img = family.image_tokens(size)
    prompt = jnp.concatenate(
        [ids[:n, :3], jnp.full((n, n_img), cfg.image_token_id, jnp.int32), ids[:n, 3:15]], axis=1
    )
    imgs = jnp.zeros((n, size, size, 3), jnp.float32)

    i2t = _greedy_decoder(graphdef, new)

    log(f"i2t decoding: {n} prompts of {prompt.shape[1]} tokens, {new} new tokens")
    d = time_calls(lambda: i2t(params, imgs, prompt), iters, counter)
    d["tokens_per_s"] = n * new / d["median_s"]
    d["cache_entries"] = i2t._cache_size()
    return {"t2i_sample": r, "i2t_decode": d}


# ----------------------------------------------------------------------------- entry point
def _pin_threads(n: int) -> None:
    if n <= 0:
        return
    if not hasattr(os, "sched_setaffinity"):
        raise ValueError("--threads needs os.sched_setaffinity (Linux)")
    cpus = sorted(os.sched_getaffinity(0))
    if n > len(cpus):
        log(f"note: {n} threads requested, {len(cpus)} CPUs available; using {len(cpus)}")
    os.sched_setaffinity(0, cpus[:n])


def define_flags() -> dict:
    """The command-line flags; defined only when run as a program (see aot_compile)."""
    return dict(
        config=config_flags.DEFINE_config_file(
            "config", None, "Training config (configs/<exp>.py[:arg]).", lock_config=True
        ),
        bench_config=flags.DEFINE_string(
            "bench_config", None, "Fixture-format config.json with a bench section."
        ),
        iters=flags.DEFINE_integer("iters", 5, "Timed calls per workload (after compilation)."),
        threads=flags.DEFINE_integer("threads", 0, "Pin to this many CPUs (0: leave as is)."),
        stage=flags.DEFINE_list("stage", [], "Stages to time (config mode; default: all)."),
        max_layers=flags.DEFINE_integer("max_layers", 0, "Cap every depth of config.model."),
        pipeline_batches=flags.DEFINE_integer("pipeline_batches", 20, "Batches timed per stage."),
        workloads=flags.DEFINE_list("workloads", list(WORKLOADS), "Bench-mode workloads."),
        sampling=flags.DEFINE_bool("sampling", True, "Config mode: also time sampling."),
        shrink=flags.DEFINE_bool(
            "shrink", False, "Bench mode: tiny model widths (tests only; not comparable)."
        ),
    )


def main(argv, f: dict) -> int:
    del argv
    if (f["config"].value is None) == (f["bench_config"].value is None):
        print("error: give exactly one of --config or --bench-config", file=sys.stderr)
        return 2
    try:
        _pin_threads(f["threads"].value)  # before JAX starts XLA's CPU thread pool
        if f["bench_config"].value:
            out = run_bench(
                f["bench_config"].value,
                f["iters"].value,
                f["workloads"].value,
                shrink=f["shrink"].value,
            )
        else:
            out = run_config(
                f["config"].value,
                f["stage"].value,
                f["iters"].value,
                f["max_layers"].value,
                f["pipeline_batches"].value,
                f["sampling"].value,
            )
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(out, sort_keys=True), flush=True)
    return 0


def _normalise_argv(argv: list[str]) -> list[str]:
    # The documented spelling is --bench-config; absl flag names use underscores.
    return [
        a.replace("--bench-config", "--bench_config", 1) if a.startswith("--bench-config") else a
        for a in argv
    ]


if __name__ == "__main__":
    _FLAGS = define_flags()
    app.run(lambda argv: sys.exit(main(argv, _FLAGS)), argv=_normalise_argv(sys.argv))
