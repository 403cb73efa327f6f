"""VQRAE plugged into the trainer: one model for every stage (encoder pre-training for the
from-scratch CPU encoder, tokenizer stage 1, tokenizer stage 2 with self-distillation, and the
unified stage 3), chosen by each stage's ``options.objective``."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from unified_mm.models.llm.qwen2 import Qwen2Config
from unified_mm.models.vqrae.config import VQRAEConfig
from unified_mm.models.vqrae.unified import UnifiedConfig, VQRAEUnified
from unified_mm.models.vqrae.vqrae import VQRAE
from unified_mm.train.family import ModelFamily
from unified_mm.train.stages import StageSpec

OBJECTIVES = ("encoder_pretrain", "tokenizer", "unified")


def _under(*prefix: str):
    def predicate(path, _value) -> bool:
        names = tuple(str(p) for p in path)
        return names[: len(prefix)] == prefix

    return predicate


class VQRAEFamily(ModelFamily):
    tasks = ("image", "t2i", "i2t")

    def __init__(self, config: ml_collections.ConfigDict):
        super().__init__(config)
        m = config.model.to_dict()
        tok_cfg = config.data.tokenizer
        if tok_cfg.kind != "hf" or tok_cfg.path:
            text_vocab, image_token = self.tokenizer.vocab_size, self.tokenizer.image_token_id
        else:  # compiling or benchmarking without the tokenizer file: sizes from the config
            text_vocab, image_token = int(m["text_vocab_size"]), int(m["image_token_id"])
        self.tokenizer_cfg = VQRAEConfig.from_dict(m["tokenizer"])
        k = self.tokenizer_cfg.quantizer.codebook_size
        llm = dict(m["llm"])
        llm["vocab_size"] = text_vocab + k + 2  # text, then the K visual codes, <boi>, <eoi>
        self.model_cfg = UnifiedConfig(
            tokenizer=self.tokenizer_cfg,
            llm=Qwen2Config.from_hf_dict(llm, dtype=m.get("dtype", "float32")),
            text_vocab_size=text_vocab,
            image_token_id=image_token,
            cond_drop_prob=0.0,  # the data pipeline already swaps in the null prompt
        )

    @functools.cached_property
    def tokenizer(self):
        from unified_mm.data.tokenizers import make_tokenizer

        return make_tokenizer(self.config.data.tokenizer)

    # -- model ---------------------------------------------------------------------------------
    def build_model(self, rngs: nnx.Rngs) -> VQRAEUnified:
        full = VQRAE(self.tokenizer_cfg, rngs=rngs)
        return VQRAEUnified(self.model_cfg, rngs=rngs, tokenizer=full)

    def param_groups(self):
        disc_backbone = _under("tokenizer", "discriminator", "backbone")
        return {
            "encoder": _under("tokenizer", "encoder"),
            "pretrain_head": _under("tokenizer", "pretrain_head"),
            "teacher": _under("tokenizer", "teacher"),
            "quantizer": _under("tokenizer", "quantizer"),
            "decoder": _under("tokenizer", "decoder"),
            "discriminator": lambda p, v: (
                _under("tokenizer", "discriminator")(p, v) and not disc_backbone(p, v)
            ),
            "disc_backbone": disc_backbone,
            "projector": _under("projector"),
            "llm": _under("llm"),
        }

    def never_trainable(self):
        return ("teacher", "disc_backbone")

    def validate(self, stages) -> None:
        for s in stages:
            objective = s.options.get("objective")
            if objective not in OBJECTIVES:
                raise ValueError(
                    f"stage {s.name!r}: options.objective {objective!r} is not one of {OBJECTIVES}"
                )
            tasks = set(s.task_batch)
            want = {"image"} if objective != "unified" else {"t2i", "i2t"}
            if not tasks <= want:
                raise ValueError(
                    f"stage {s.name!r}: objective {objective} trains tasks {sorted(want)}, "
                    f"not {sorted(tasks - want)}"
                )
            if s.options.get("distill") and not self.tokenizer_cfg.with_teacher:
                raise ValueError(f"stage {s.name!r}: distill needs model.tokenizer.with_teacher")
            if s.image_size != self.tokenizer_cfg.encoder.resolution:
                raise ValueError(
                    f"stage {s.name!r}: image_size {s.image_size} differs from the encoder "
                    f"resolution {self.tokenizer_cfg.encoder.resolution}"
                )

    def pretrained_params(self):
        """Weights named in the tokenizer config (encoder, DINO discriminator, LPIPS), read by the
        model's own loaders into an abstract copy; only the leaves they filled are returned."""
        enc, loss = self.tokenizer_cfg.encoder, self.tokenizer_cfg.loss
        if not (enc.pretrained_path or loss.lpips_path or loss.disc.dino_path):
            return None
        model = nnx.eval_shape(lambda: self.build_model(nnx.Rngs(0)))
        model.tokenizer.load_pretrained()
        flat = [
            (path, v)
            for path, v in nnx.to_flat_state(nnx.state(model))
            if isinstance(getattr(v, "value", v), np.ndarray | jax.Array)
        ]
        return nnx.to_pure_dict(nnx.from_flat_state(flat))

    def stage_start_params(self, params, stage, previous):
        """Stage 2 distils against a frozen copy of the encoder as it enters the stage."""
        if stage.options.get("distill") and not (previous and previous.options.get("distill")):
            params["tokenizer"]["teacher"] = jax.tree.map(jnp.copy, params["tokenizer"]["encoder"])
        return params

    # -- data ----------------------------------------------------------------------------------
    def make_train_iterator(self, stage: StageSpec, *, seed, process_index, process_count):
        from unified_mm.data.config import with_overrides
        from unified_mm.data.pipeline import make_train_iterator

        data_cfg = with_overrides(self.config.data, stage.data)
        g = self.tokenizer_cfg.encoder.grid
        data_cfg.image_tokens = g * g
        return make_train_iterator(
            data_cfg,
            task_batch=dict(stage.task_batch),
            image_size=stage.image_size,
            seed=seed,
            process_index=process_index,
            process_count=process_count,
            tokenizer=self.tokenizer,
        )

    def abstract_batch(self, stage: StageSpec, batch_per_task):
        from unified_mm.data.batch_spec import abstract_task_batch
        from unified_mm.data.config import with_overrides

        data = with_overrides(self.config.data, stage.data)
        return abstract_task_batch(data, stage.image_size, batch_per_task)

    def flops_per_example(self, stage: StageSpec) -> dict[str, float]:
        """Analytic training FLOPs per example (models/vqrae/flops.py). The adaptive GAN weight
        is counted when the stage reaches ``gan_start_step`` (the loss gets the global step)."""
        from unified_mm.data.config import with_overrides
        from unified_mm.models.vqrae.flops import training_flops_per_example
        from unified_mm.train.stages import stage_boundaries, stages_from_config

        data = with_overrides(self.config.data, stage.data)
        last_step = stage_boundaries(stages_from_config(self.config))[stage.index + 1] - 1
        return training_flops_per_example(
            self.model_cfg,
            stage.task_batch,
            objective=stage.options["objective"],
            distill=bool(stage.options.get("distill", False)),
            gan_on=last_step >= self.tokenizer_cfg.loss.gan_start_step,
            text_len=int(data.max_text_len),
            und_len=int(data.max_und_len),
            examples_per_call={t: n // stage.grad_accum for t, n in stage.task_batch.items()},
        )

    # -- losses --------------------------------------------------------------------------------
    def loss(self, model: VQRAEUnified, batch, key, *, step, stage: StageSpec):
        objective = stage.options["objective"]
        w = stage.loss_weights
        if objective == "encoder_pretrain":
            loss, m = model.tokenizer.encoder_pretrain_loss(batch["image"]["image"], key)
            return loss, {"loss/image": loss, **_prefixed("pretrain", m)}
        if objective == "tokenizer":
            loss, m = model.tokenizer.tokenizer_loss(
                batch["image"]["image"],
                key,
                step=step,
                stage_distill=bool(stage.options.get("distill", False)),
            )
            return loss, {"loss/image": loss, **_prefixed("tok", m)}
        total = jnp.zeros((), jnp.float32)
        metrics = {}
        k1, k2 = jax.random.split(key)
        if "t2i" in batch:
            b = batch["t2i"]
            loss, m = model.t2i_loss(b["image"], b["input_ids"], b["attention_mask"], k1)
            total += w.get("t2i", 1.0) * loss
            metrics.update({"loss/t2i": loss, "t2i/accuracy": m["t2i/accuracy"]})
        if "i2t" in batch:
            b = batch["i2t"]
            loss, m = model.i2t_loss(
                b["image"], b["input_ids"], b["attention_mask"], b["labels"], k2
            )
            total += w.get("i2t", 1.0) * loss
            metrics.update({"loss/i2t": loss, "i2t/token_accuracy": m["i2t/accuracy"]})
        return total, metrics

    # -- previews and evaluation ------------------------------------------------------------------
    def previews(self, model: VQRAEUnified, stage: StageSpec, key) -> dict:
        from unified_mm.data.shapes import ShapesDataset

        ds = ShapesDataset("heldout", seed=0, image_size=stage.image_size)
        images = np.stack([ds[i].image for i in range(8)]).astype(np.float32) / 127.5 - 1.0
        recon, _ = _reconstruct_fn(model)(jnp.asarray(images))
        to_u8 = lambda x: np.asarray(jnp.clip(127.5 * x + 128.0, 0, 255)).astype(np.uint8)  # noqa: E731
        return {"images": {"reconstruction": np.concatenate([to_u8(images), to_u8(recon)])}}

    def evaluate(self, model: VQRAEUnified, stage: StageSpec, *, workdir: str, step: int) -> dict:
        from unified_mm.eval.vqrae_suite import evaluate_vqrae

        return evaluate_vqrae(model, self, stage, workdir=workdir, step=step)


def _prefixed(prefix: str, metrics: dict) -> dict:
    return {f"{prefix}/{k.split('/')[-1]}": v for k, v in metrics.items() if jnp.ndim(v) == 0}


@functools.lru_cache(maxsize=8)
def _reconstruct_jit(graphdef):
    @jax.jit
    def run(state, images):
        model = nnx.merge(graphdef, state)
        return model.tokenizer.reconstruct(images)

    return run


def _reconstruct_fn(model: VQRAEUnified):
    graphdef, state = nnx.split(model)
    run = _reconstruct_jit(graphdef)
    return lambda images: run(state, images)


__all__ = ["VQRAEFamily", "OBJECTIVES"]
