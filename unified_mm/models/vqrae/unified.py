"""Stage 3: a unified model on top of the frozen VQRAE tokenizer (vqrae_rae.md 3.1-3.2).

* Understanding (i2t): the continuous features Z_I go through a LLaVA `mlp2x_gelu` projector (Linear,
  exact GELU, Linear) and replace the `image_token_id` placeholder span of the prompt (one placeholder
  per image token, in raster order); loss: token-mean CE of logits[:, :-1] against labels[:, 1:]
  (HF convention, -100 ignored).
* Generation (t2i): next-token prediction of the discrete codes with the LLM vocabulary extended by
  the K codes. Vocabulary layout: [0, text_vocab_size) text, then code k at text_vocab_size + k, then
  <boi> = text_vocab_size + K and <eoi> = text_vocab_size + K + 1. Training sequence:
  [text (right padded; pads masked and not advancing positions), <boi>, codes]; CE only on the codes.
  Classifier-free guidance: with probability `cond_drop_prob` a row's text is replaced by the null
  prompt (by default the text is fully masked, i.e. an empty prompt).
* Sampling: prefill [prompt, <boi>] for the conditional and the null prompt together (2B rows), then a
  `lax.scan` of one-token steps with the Qwen2 KV cache; logits are restricted to the code range, CFG
  `l_u + s (l_c - l_u)`, temperature and top-k; the codes are decoded to pixels by the tokenizer.
  ASSUMPTIONS: raster order, CFG on logits, cond_drop_prob 0.1 (LlamaGen's value); VQRAE's own
  sampling settings were not recovered (section 3.2).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from unified_mm.models.llm.decoding import generate, prefill
from unified_mm.models.llm.qwen2 import Qwen2, Qwen2Config
from unified_mm.models.vqrae.config import VQRAEConfig
from unified_mm.models.vqrae.layers import dense
from unified_mm.models.vqrae.losses import token_cross_entropy
from unified_mm.models.vqrae.vqrae import VQRAE

Array = jax.Array
sg = jax.lax.stop_gradient


@dataclasses.dataclass(frozen=True)
class UnifiedConfig:
    tokenizer: VQRAEConfig
    llm: Qwen2Config
    text_vocab_size: int
    image_token_id: int
    cond_drop_prob: float = 0.1

    def __post_init__(self):
        k = self.tokenizer.quantizer.codebook_size
        need = self.text_vocab_size + k + 2
        if self.llm.vocab_size < need:
            raise ValueError(
                f"UnifiedConfig: llm.vocab_size {self.llm.vocab_size} < text {self.text_vocab_size}"
                f" + {k} codes + 2 markers = {need}"
            )
        if not 0 <= self.image_token_id < self.text_vocab_size:
            raise ValueError(f"UnifiedConfig: image_token_id {self.image_token_id} not a text id")

    @property
    def code_offset(self) -> int:
        return self.text_vocab_size

    @property
    def boi_id(self) -> int:
        return self.text_vocab_size + self.tokenizer.quantizer.codebook_size

    @property
    def eoi_id(self) -> int:
        return self.boi_id + 1

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> UnifiedConfig:
        d = dict(d)
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"UnifiedConfig: unknown keys {unknown}")
        d["tokenizer"] = VQRAEConfig.from_dict(d.get("tokenizer"))
        llm = d.get("llm")
        d["llm"] = llm if isinstance(llm, Qwen2Config) else Qwen2Config(**dict(llm))
        return cls(**d)


def unified_trainable_filter() -> nnx.filterlib.Filter:
    """Stage 3 trains the projector and the LLM; the tokenizer stays frozen."""
    return nnx.All(nnx.Param, nnx.Any(nnx.PathContains("projector"), nnx.PathContains("llm")))


class Projector(nnx.Module):
    """LLaVA-1.5 mlp2x_gelu: Linear(d -> H), GELU (exact), Linear(H -> H)."""

    def __init__(self, d_in: int, d_out: int, *, rngs: nnx.Rngs):
        self.fc1 = dense(d_in, d_out, (None, "mlp"), rngs=rngs)
        self.fc2 = dense(d_out, d_out, ("mlp", "embed"), rngs=rngs)

    def __call__(self, x: Array) -> Array:
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


def _concrete(x: Array) -> np.ndarray | None:
    """The value of `x` outside jit; None while tracing (then no eager check is possible)."""
    try:
        return np.asarray(x)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
        return None


class VQRAEUnified(nnx.Module):
    def __init__(self, cfg: UnifiedConfig, *, rngs: nnx.Rngs, tokenizer: VQRAE | None = None):
        """``tokenizer``: an existing full VQRAE (the trainer's single model for all stages keeps
        its teacher and GAN parts); by default a stage-3-only tokenizer without them is built."""
        self.cfg = cfg
        tok_cfg = dataclasses.replace(
            cfg.tokenizer,
            with_teacher=False,
            loss=dataclasses.replace(cfg.tokenizer.loss, gan_weight=0.0, lpips_weight=0.0),
        )
        self.tokenizer = tokenizer if tokenizer is not None else VQRAE(tok_cfg, rngs=rngs)
        self.projector = Projector(tok_cfg.encoder.hidden_size, cfg.llm.hidden_size, rngs=rngs)
        self.llm = Qwen2(cfg.llm, rngs=rngs)

    @property
    def num_image_tokens(self) -> int:
        g = self.tokenizer.grid
        return g[0] * g[1]

    # ------------------------------------------------------------------------- understanding
    def image_embeds(self, images: Array) -> Array:
        """Projected continuous features [B, N, H] (the tokenizer is frozen: stop_gradient)."""
        return self.projector(sg(self.tokenizer.encode_continuous(images)))

    def _i2t_inputs(self, images: Array, input_ids: Array) -> Array:
        n = self.num_image_tokens
        is_img = input_ids == self.cfg.image_token_id
        counts = _concrete(jnp.sum(is_img, axis=1))
        if counts is not None and not (counts == n).all():
            raise ValueError(f"i2t: every row needs exactly {n} image placeholders, got {counts}")
        feats = self.image_embeds(images).astype(self.llm.cfg.compute_dtype)
        idx = jnp.clip(jnp.cumsum(is_img, axis=1) - 1, 0, n - 1)
        picked = jnp.take_along_axis(feats, idx[..., None], axis=1)
        return jnp.where(is_img[..., None], picked, self.llm.embed(input_ids))

    def i2t_loss(
        self,
        images: Array,
        input_ids: Array,
        attention_mask: Array,
        labels: Array,
        key: Array | None = None,
        *,
        deterministic: bool = False,
    ) -> tuple[Array, dict[str, Array]]:
        """Token-mean CE of the answer tokens given the image (no randomness: `key` unused)."""
        del key, deterministic
        embeds = self._i2t_inputs(images, input_ids)
        hidden, _ = self.llm(embeds, attention_mask=attention_mask)
        logits = self.llm.logits(hidden[:, :-1])
        loss, n = token_cross_entropy(logits, labels[:, 1:])
        valid = labels[:, 1:] != -100
        acc = jnp.sum((jnp.argmax(logits, -1) == labels[:, 1:]) & valid) / jnp.maximum(n, 1)
        return loss, {"i2t/loss": loss, "i2t/accuracy": acc, "i2t/tokens": n.astype(jnp.float32)}

    def generate_i2t(
        self,
        images: Array,
        input_ids: Array,
        attention_mask: Array,
        *,
        max_new_tokens: int,
        eos_id: int,
        pad_id: int,
        key: Array | None = None,
        temperature: float = 1.0,
        top_k: int = 0,
        greedy: bool = True,
    ) -> tuple[Array, Array]:
        """Answers a prompt about the image: (new ids [B, max_new_tokens], step logits)."""
        embeds = self._i2t_inputs(images, input_ids)
        return generate(
            self.llm,
            embeds,
            attention_mask,
            max_new_tokens=max_new_tokens,
            eos_id=eos_id,
            pad_id=pad_id,
            key=key,
            temperature=temperature,
            top_k=top_k,
            greedy=greedy,
        )

    # ------------------------------------------------------------------------- generation
    def image_codes(self, images: Array) -> Array:
        """Code ids [B, N] of the frozen tokenizer."""
        _, ids, _, _ = self.tokenizer.quantize(self.tokenizer.encode_continuous(images))
        return sg(ids)

    def t2i_logits(self, input_ids: Array, attention_mask: Array, codes: Array) -> Array:
        """Teacher-forced logits [B, N, V] predicting each code from [text, <boi>, previous codes]."""
        b, t = input_ids.shape
        n = codes.shape[1]
        cfg = self.cfg
        tokens = jnp.concatenate(
            [
                input_ids,
                jnp.full((b, 1), cfg.boi_id, input_ids.dtype),
                (codes + cfg.code_offset).astype(input_ids.dtype),
            ],
            axis=1,
        )
        mask = jnp.concatenate([attention_mask.astype(bool), jnp.ones((b, 1 + n), bool)], axis=1)
        hidden, _ = self.llm(self.llm.embed(tokens[:, :-1]), attention_mask=mask[:, :-1])
        return self.llm.logits(hidden[:, t:])

    def t2i_loss(
        self,
        images: Array,
        input_ids: Array,
        attention_mask: Array,
        key: Array,
        *,
        deterministic: bool = False,
        null_input_ids: Array | None = None,
        null_attention_mask: Array | None = None,
    ) -> tuple[Array, dict[str, Array]]:
        """Next-code CE on the visual tokens only. With probability cond_drop_prob (training only) a
        row's text becomes the null prompt (`null_*` [T] or [B, T]; default: the text fully masked)."""
        cfg = self.cfg
        codes = self.image_codes(images)
        if not deterministic and cfg.cond_drop_prob > 0:
            b = input_ids.shape[0]
            drop = jax.random.bernoulli(key, cfg.cond_drop_prob, (b, 1))
            if null_input_ids is None:
                null_ids, null_mask = input_ids, jnp.zeros_like(attention_mask)
            else:
                if null_input_ids.shape[-1] != input_ids.shape[1]:
                    raise ValueError(
                        f"t2i_loss: null prompt length {null_input_ids.shape[-1]} != text length "
                        f"{input_ids.shape[1]}; right-pad it to the same length"
                    )
                null_ids = jnp.broadcast_to(null_input_ids, input_ids.shape)
                null_mask = jnp.broadcast_to(null_attention_mask, attention_mask.shape)
            input_ids = jnp.where(drop, null_ids, input_ids)
            attention_mask = jnp.where(drop, null_mask, attention_mask)
        logits = self.t2i_logits(input_ids, attention_mask, codes)
        targets = codes + cfg.code_offset
        loss, _ = token_cross_entropy(logits, targets)
        acc = jnp.mean(jnp.argmax(logits, -1) == targets)
        return loss, {"t2i/loss": loss, "t2i/accuracy": acc}

    def sample_t2i(
        self,
        input_ids: Array,
        attention_mask: Array,
        null_input_ids: Array | None,
        null_attention_mask: Array | None,
        key: Array,
        *,
        temperature: float | Array = 1.0,
        top_k: int = 0,
        cfg_scale: float | Array = 1.0,
        grid: tuple[int, int] | None = None,
        greedy: bool = False,
    ) -> tuple[Array, Array]:
        """Samples codes for right-padded prompts and decodes them: (images [-1, 1], code ids [B, N]).

        Jit with `top_k`, `grid` and `greedy` static. Without a null prompt there is no CFG.
        Step i draws with `fold_in(key, i)`.
        """
        cfg = self.cfg
        grid = self.tokenizer.grid if grid is None else tuple(grid)
        n = grid[0] * grid[1]
        k = cfg.tokenizer.quantizer.codebook_size
        b = input_ids.shape[0]
        use_cfg = null_input_ids is not None
        if use_cfg:
            null_ids = jnp.broadcast_to(null_input_ids, (b, null_input_ids.shape[-1]))
            null_mask = jnp.broadcast_to(null_attention_mask, null_ids.shape)
            t = max(input_ids.shape[1], null_ids.shape[1])

            def pad(x: Array) -> Array:
                return jnp.pad(x, ((0, 0), (0, t - x.shape[1])))

            ids = jnp.concatenate([pad(input_ids), pad(null_ids)], axis=0)
            mask = jnp.concatenate([pad(attention_mask), pad(null_mask)], axis=0)
        else:
            ids, mask = input_ids, attention_mask
        rows = ids.shape[0]
        ids = jnp.concatenate([ids, jnp.full((rows, 1), cfg.boi_id, ids.dtype)], axis=1)
        mask = jnp.concatenate([mask.astype(bool), jnp.ones((rows, 1), bool)], axis=1)
        first, cache = prefill(self.llm, self.llm.embed(ids), mask, max_new_tokens=n)
        off = cfg.code_offset

        def pick(logits: Array, i: Array) -> Array:
            logits = logits[:, off : off + k].astype(jnp.float32)
            if use_cfg:
                cond, uncond = logits[:b], logits[b:]
                logits = uncond + cfg_scale * (cond - uncond)
            if greedy:
                return jnp.argmax(logits, axis=-1).astype(jnp.int32)
            logits = logits / temperature
            if top_k > 0:
                kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
                logits = jnp.where(logits < kth, -jnp.inf, logits)
            return jax.random.categorical(jax.random.fold_in(key, i), logits).astype(jnp.int32)

        graphdef, state = nnx.split(self.llm)

        def step(carry, i):
            cache, logits = carry
            code = pick(logits, i)
            tok = jnp.tile(code + off, rows // b)[:, None]
            llm = nnx.merge(graphdef, state)
            hidden, cache = llm(llm.embed(tok), cache=cache)
            return (cache, llm.logits(hidden[:, 0])), code

        (_, last), codes = jax.lax.scan(step, (cache, first), jnp.arange(n - 1))
        codes = jnp.concatenate([codes.T, pick(last, jnp.int32(n - 1))[:, None]], axis=1)
        return self.tokenizer.decode_ids(codes, grid), codes
