"""Harmon plugged into the trainer: parameter groups, the two task losses, previews, evaluation."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from unified_mm.models.harmon.harmon import Harmon, HarmonConfig
from unified_mm.train.family import ModelFamily
from unified_mm.train.stages import StageSpec

_ENCODER_PARTS = frozenset(
    {
        "class_emb",
        "conv_stem",
        "fake_latent",
        "z_proj",
        "z_proj_ln",
        "encoder_pos_embed_learned",
        "encoder_blocks",
        "encoder_norm",
    }
)
_DECODER_PARTS = frozenset(
    {
        "decoder_embed",
        "mask_token",
        "decoder_pos_embed_learned",
        "decoder_blocks",
        "decoder_norm",
        "diffusion_pos_embed_learned",
    }
)


def _under(top: str, parts: frozenset[str] | None = None):
    def predicate(path, _value) -> bool:
        names = [str(p) for p in path]
        if not names or names[0] != top:
            return False
        return parts is None or (len(names) > 1 and names[1] in parts)

    return predicate


def harmon_config_from(model_cfg: ml_collections.ConfigDict, tokenizer=None) -> HarmonConfig:
    """HarmonConfig from a config's ``model`` section (the fixtures' config.json layout plus
    ``dtype``, ``remat``, ``tokenizer`` ("kl16" | "pixel"), ``pixel_patch`` and
    ``pixel_colour_cell``)."""
    d = model_cfg.to_dict()
    cfg = HarmonConfig.from_fixture_json(
        d,
        dtype=d.get("dtype", "float32"),
        remat=bool(d.get("remat", False)),
        tokenizer=d.get("tokenizer", "kl16"),
        pixel_patch=d.get("pixel_patch"),
        pixel_colour_cell=int(d.get("pixel_colour_cell", 0)),
    )
    # Official 0.1 protects a pretrained MAR encoder from the understanding loss; a model trained
    # from scratch may want the full gradient (``model.harmon.grad_scale``).
    grad_scale = d.get("harmon", {}).get("grad_scale")
    if grad_scale is not None:
        cfg = dataclasses.replace(cfg, grad_scale=float(grad_scale))
    if tokenizer is not None:  # special ids come from the text tokenizer in use
        cfg = dataclasses.replace(
            cfg,
            image_token_id=tokenizer.image_token_id,
            pad_token_id=tokenizer.pad_id,
            eos_token_id=tokenizer.eos_id,
        )
    return cfg


def label_rows(und_len: int, image_tokens: int) -> int:
    """Most next-token targets one understanding sample can label: the image span (at least one
    template token in, so all of it lies inside the shifted targets) never carries labels. Logits
    are taken on these rows only: in the paper configs 255 of 1343 rows at 512 px (1088 image
    rows) and 1023 at 256 px."""
    return und_len - 1 - image_tokens


class HarmonFamily(ModelFamily):
    tasks = ("t2i", "i2t")
    # None: a mask ratio drawn per step (training); a value fixes it (benchmarks that must match
    # a workload specification).
    t2i_mask_ratio: float | None = None

    def __init__(self, config: ml_collections.ConfigDict):
        super().__init__(config)
        tok_cfg = config.data.tokenizer
        # A Qwen2.5 tokenizer path may be absent when only compiling or benchmarking: the model
        # then keeps the official special ids from the config.
        usable = tok_cfg.kind != "hf" or bool(tok_cfg.path)
        self.model_cfg = harmon_config_from(config.model, self.tokenizer if usable else None)
        if usable and self.tokenizer.vocab_size > self.model_cfg.llm.vocab_size:
            raise ValueError(
                f"tokenizer has {self.tokenizer.vocab_size} ids but the LLM vocabulary is "
                f"{self.model_cfg.llm.vocab_size}"
            )

    @functools.cached_property
    def tokenizer(self):
        from unified_mm.data.tokenizers import make_tokenizer

        return make_tokenizer(self.config.data.tokenizer)

    # -- model ---------------------------------------------------------------------------------
    def build_model(self, rngs: nnx.Rngs) -> Harmon:
        return Harmon(self.model_cfg, rngs=rngs)

    def param_groups(self):
        return {
            "vae": _under("vae"),
            "mar_encoder": _under("mar", _ENCODER_PARTS),
            "mar_decoder": _under("mar", _DECODER_PARTS),
            "diffloss": _under("mar", frozenset({"diffloss"})),
            "projectors": lambda path, v: bool(path) and str(path[0]) in ("proj_in", "proj_out"),
            "llm": _under("llm"),
        }

    def pretrained_params(self):
        """Official files named in ``config.init`` (harmon_mar.md 2.8): a full Harmon state_dict
        (+ kl16.ckpt), or Qwen2.5 safetensors for the LLM alone (+ kl16.ckpt)."""
        init = self.config.get("init", None)
        if init is None:
            return None
        from unified_mm.models.harmon import convert
        from unified_mm.models.llm import qwen2_convert

        out: dict = {}
        vae_sd = convert.load_torch_file(init.vae_checkpoint) if init.vae_checkpoint else None
        if init.harmon_checkpoint:
            sd = convert.load_torch_file(init.harmon_checkpoint)
            out = convert.harmon_params_from_official(sd, vae_sd, self.model_cfg)
            if vae_sd is None and self.model_cfg.vae is not None:
                out.pop("vae", None)
        elif vae_sd is not None:
            out["vae"] = convert.vae_params_from_official(vae_sd, self.model_cfg)
        if init.llm_safetensors and not init.harmon_checkpoint:
            hf = qwen2_convert.load_hf_safetensors(init.llm_safetensors)
            out["llm"] = qwen2_convert.params_from_hf(hf, self.model_cfg.llm)
        return out or None

    def never_trainable(self):
        return ("vae",)

    def validate(self, stages) -> None:
        stride = self.model_cfg.stride
        ev = self.config.get("eval", None)
        num_iter = int(ev.get("num_iter", 0) or 0) if ev is not None else 0
        eval_size = int(ev.get("image_size", 0) or 0) if ev is not None else 0
        for s in stages:
            if s.image_size % stride:
                raise ValueError(
                    f"stage {s.name!r}: image_size {s.image_size} is not a multiple of the "
                    f"tokenizer stride {stride}"
                )
            # Previews and the evaluation after the stage sample at least one token per AR step:
            # catch it here, not after the stage has trained.
            for size in sorted({s.image_size, eval_size or s.image_size}):
                h, w = self.model_cfg.latent_grid(size)
                if num_iter > h * w:
                    raise ValueError(
                        f"stage {s.name!r}: eval.num_iter {num_iter} exceeds the {h * w} tokens "
                        f"of a {size} px image"
                    )

    def image_tokens(self, image_size: int) -> int:
        """LLM rows per image in the understanding path: latent tokens plus buffers."""
        h, w = self.model_cfg.latent_grid(image_size)
        return h * w + self.model_cfg.mar.buffer_size

    # -- data ----------------------------------------------------------------------------------
    def make_train_iterator(self, stage: StageSpec, *, seed, process_index, process_count):
        from unified_mm.data.pipeline import make_train_iterator

        data_cfg = stage_data_config(self.config.data, stage)
        data_cfg.image_tokens = self.image_tokens(stage.image_size)
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

        data = stage_data_config(self.config.data, stage)
        return abstract_task_batch(data, stage.image_size, batch_per_task)

    # -- losses --------------------------------------------------------------------------------
    def loss(self, model: Harmon, batch, key, *, step, stage: StageSpec):
        total = jnp.zeros((), jnp.float32)
        metrics = {}
        k_t2i, k_i2t = jax.random.split(key)
        if "t2i" in batch:
            b = batch["t2i"]
            loss, m = model.t2i_loss(
                b["image"],
                b["input_ids"],
                b["attention_mask"],
                k_t2i,
                deterministic=False,
                mask_ratio=None
                if self.t2i_mask_ratio is None
                else jnp.float32(self.t2i_mask_ratio),
            )
            total += stage.loss_weights.get("t2i", 1.0) * loss
            metrics.update({"loss/t2i": loss, "t2i/mse": m["mse"], "t2i/vb": m["vb"]})
        if "i2t" in batch:
            b = batch["i2t"]
            und_len = b["labels"].shape[1]
            loss, m = model.i2t_loss(
                b["image"],
                b["input_ids"],
                b["attention_mask"],
                b["labels"],
                k_i2t,
                deterministic=False,
                grad_scale=self.model_cfg.grad_scale,
                label_rows_per_sample=label_rows(und_len, self.image_tokens(stage.image_size)),
            )
            total += stage.loss_weights.get("i2t", 1.0) * loss
            metrics.update({"loss/i2t": loss, "i2t/token_accuracy": m["accuracy"]})
        return total, metrics

    def flops_per_example(self, stage: StageSpec) -> Mapping[str, float]:
        from unified_mm.models.harmon.flops import training_flops_per_example

        data = stage_data_config(self.config.data, stage)
        return training_flops_per_example(
            self.model_cfg,
            image_size=stage.image_size,
            text_len=int(data.max_text_len),
            und_len=int(data.max_und_len),
            trainable=tuple(stage.trainable),
        )

    # -- previews and evaluation ------------------------------------------------------------------
    def previews(self, model: Harmon, stage: StageSpec, key) -> dict:
        from unified_mm.eval import harmon_inference as inf

        prompts = list(self.config.eval.get("preview_prompts", ()))
        if not prompts:
            return {}
        images = inf.text_to_image(
            model,
            self.tokenizer,
            prompts,
            image_size=stage.image_size,
            key=key,
            **inf.sampling_options(self.config.eval),
        )
        return {"images": {"t2i": images}}

    def evaluate(self, model: Harmon, stage: StageSpec, *, workdir: str, step: int) -> dict:
        from unified_mm.eval.suite import evaluate_harmon

        return evaluate_harmon(model, self, stage, workdir=workdir, step=step)


def stage_data_config(data_cfg: ml_collections.ConfigDict, stage: StageSpec):
    """The data config with the stage's overrides applied (a copy; the config stays locked)."""
    from unified_mm.data.config import with_overrides

    return with_overrides(data_cfg, stage.data)
