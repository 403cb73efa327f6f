"""Frozen dataclass configurations of the VQRAE model family (vqrae_rae.md).

Every value the VQRAE paper leaves open defaults to RAE's recipe (vqrae_rae.md section 5) and is marked
"ASSUMPTION" next to it. Each config has `from_dict` so ml_collections / YAML dicts map onto it; unknown
keys raise a one-line ValueError that names them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Literal, TypeVar

_T = TypeVar("_T")

EncoderKind = Literal["siglip2", "dinov2_reg", "vit"]
Activation = Literal["gelu", "gelu_tanh"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)


def _from_dict(
    cls: type[_T], d: Mapping[str, Any] | _T | None, nested: Mapping[str, type] = ()
) -> _T:
    """Builds a frozen dataclass from a mapping; nested dataclass fields are converted recursively."""
    if d is None:
        return cls()
    if isinstance(d, cls):
        return d
    if not isinstance(d, Mapping):
        raise ValueError(f"{cls.__name__}.from_dict expects a mapping, got {type(d).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown keys {unknown}; valid keys are {sorted(names)}")
    kwargs = {}
    for k, v in d.items():
        if k in dict(nested):
            v = dict(nested)[k].from_dict(v)
        elif isinstance(v, list):
            v = tuple(v)
        kwargs[k] = v
    return cls(**kwargs)


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    """A vision foundation encoder (SigLIP2, DINOv2 with registers) or a small ViT trained from scratch.

    `layer_index` follows the Hugging Face `hidden_states` indexing: 0 is the embedding output, k the
    output of block k, -1 the last block, -2 the penultimate one (LLaVA's `mm_vision_select_layer`).
    `final_ln` applies the encoder's final LayerNorm to that layer; `final_ln_affine=False` drops its
    scale and bias as RAE does (vqrae_rae.md 5.1; ASSUMPTION for VQRAE, section 1.2 leaves it open).
    """

    kind: EncoderKind = "siglip2"
    pretrained_path: str | None = (
        None  # HF .safetensors or big_vision .npz, read by load_pretrained()
    )
    image_size: int = (
        256  # the size of the encoder's stored position-embedding grid times patch_size
    )
    input_size: int | None = (
        None  # resolution images are resized to before the encoder; None: image_size
    )
    patch_size: int = 16
    hidden_size: int = 1152
    num_layers: int = 27
    num_heads: int = 16
    mlp_dim: int = 4304
    layer_norm_eps: float = 1e-6
    hidden_act: Activation = "gelu_tanh"
    qkv_bias: bool = True
    num_register_tokens: int = 0  # DINOv2-reg: 4
    layerscale_value: float | None = None  # DINOv2: 1.0 (loaded); None: no LayerScale
    layer_index: int = -1
    final_ln: bool = True
    final_ln_affine: bool = False
    image_mean: tuple[float, float, float] = HALF
    image_std: tuple[float, float, float] = HALF
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: bool = False

    def __post_init__(self):
        if self.kind not in ("siglip2", "dinov2_reg", "vit"):
            raise ValueError(
                f"EncoderConfig.kind must be siglip2|dinov2_reg|vit, got {self.kind!r}"
            )
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"EncoderConfig: hidden_size {self.hidden_size} not divisible by num_heads {self.num_heads}"
            )
        if self.image_size % self.patch_size or self.resolution % self.patch_size:
            raise ValueError(
                f"EncoderConfig: image sizes {self.image_size}/{self.resolution} must be multiples of "
                f"patch_size {self.patch_size}"
            )
        if not -(self.num_layers + 1) <= self.layer_index <= self.num_layers:
            raise ValueError(
                f"EncoderConfig.layer_index {self.layer_index} out of range for {self.num_layers} layers"
            )

    @property
    def resolution(self) -> int:
        """Pixel size the encoder actually runs at."""
        return self.input_size or self.image_size

    @property
    def grid(self) -> int:
        return self.resolution // self.patch_size

    @property
    def layers_to_run(self) -> int:
        """Number of blocks needed to produce `layer_index` (HF hidden_states indexing)."""
        i = self.layer_index
        return i if i >= 0 else self.num_layers + 1 + i

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | EncoderConfig | None) -> EncoderConfig:
        return _from_dict(cls, d)

    @classmethod
    def siglip2_so400m(cls, image_size: int = 256, **kw: Any) -> EncoderConfig:
        """google/siglip2-so400m-patch16-{256,384,512}; VQRAE's SigLIP2 variant (vqrae_rae.md 1.2)."""
        return cls(
            kind="siglip2",
            image_size=image_size,
            patch_size=16,
            hidden_size=1152,
            num_layers=27,
            num_heads=16,
            mlp_dim=4304,
            hidden_act="gelu_tanh",
            **kw,
        )

    @classmethod
    def dinov2_reg_base(cls, **kw: Any) -> EncoderConfig:
        """facebook/dinov2-with-registers-base as RAE uses it: 518 grid, run at 224 (vqrae_rae.md 5.1)."""
        base = dict(
            kind="dinov2_reg",
            image_size=518,
            input_size=224,
            patch_size=14,
            hidden_size=768,
            num_layers=12,
            num_heads=12,
            mlp_dim=3072,
            hidden_act="gelu",
            num_register_tokens=4,
            layerscale_value=1.0,
            image_mean=IMAGENET_MEAN,
            image_std=IMAGENET_STD,
        )
        return cls(**{**base, **kw})


@dataclasses.dataclass(frozen=True)
class SimVQConfig:
    """SimVQ (vqrae_rae.md 1.3): frozen random C (K x e) times a learnable linear W, L2 lookup in fp32.

    `legacy_beta_placement=False` (default) puts beta on the commitment term, the standard VQ-VAE form
    that the paper's (garbled) formula reads as; SimVQ's own `legacy=True` default puts beta on the
    codebook term instead. ASSUMPTION: VQRAE's choice is unknown (section 1.3).
    """

    codebook_size: int = 16384
    code_dim: int = 1536
    beta: float = 0.25
    legacy_beta_placement: bool = False

    def __post_init__(self):
        if self.codebook_size < 2 or self.code_dim < 1:
            raise ValueError(f"SimVQConfig: bad sizes K={self.codebook_size}, e={self.code_dim}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | SimVQConfig | None) -> SimVQConfig:
        return _from_dict(cls, d)


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """RAE GeneralDecoder-style ViT decoder (vqrae_rae.md 1.4, 5.2). Zero/None fields mirror the encoder.

    ASSUMPTION: "symmetric" is taken literally (width, depth, heads, MLP copied from the encoder), with
    RAE's decoder numerics: LayerNorm eps 1e-12 and exact-erf GELU.
    """

    hidden_size: int = 0
    num_layers: int = 0
    num_heads: int = 0
    mlp_dim: int = 0
    patch_size: int = 0  # pixels per token side; 0: the encoder patch size
    layer_norm_eps: float = 1e-12
    hidden_act: Activation = "gelu"
    dtype: str | None = None  # None: the encoder's dtype
    remat: bool = False

    def resolved(self, enc: EncoderConfig) -> DecoderConfig:
        """The mirrored configuration with every 0/None field filled from the encoder."""
        return dataclasses.replace(
            self,
            hidden_size=self.hidden_size or enc.hidden_size,
            num_layers=self.num_layers or enc.num_layers,
            num_heads=self.num_heads or enc.num_heads,
            mlp_dim=self.mlp_dim or enc.mlp_dim,
            patch_size=self.patch_size or enc.patch_size,
            dtype=self.dtype or enc.dtype,
        )

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | DecoderConfig | None) -> DecoderConfig:
        return _from_dict(cls, d)


@dataclasses.dataclass(frozen=True)
class DiscConfig:
    """GAN discriminator. "dino": RAE's frozen DINO ViT-S/8 with trainable conv heads (vqrae_rae.md 5.4);
    "patch": a small convolutional PatchGAN (cheap, for CPU runs)."""

    kind: Literal["dino", "patch"] = "dino"
    # dino
    dino_path: str | None = None  # converted DINO ViT-S/8 weights (.npz / .safetensors)
    dino_input_size: int = 224
    dino_patch_size: int = 8
    dino_hidden_size: int = 384
    dino_num_layers: int = 12
    dino_num_heads: int = 6
    dino_mlp_dim: int = 1536
    key_depths: tuple[int, ...] = (2, 5, 8, 11)
    head_kernel_size: int = 9
    norm_eps: float = 1e-6
    power_iterations: int = 4
    # patch
    patch_channels: int = 64
    patch_layers: int = 3
    # augmentation (DiffAug: translation + colour, cutout off, as RAE)
    diffaug: bool = True

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | DiscConfig | None) -> DiscConfig:
        return _from_dict(cls, d)


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Tokenizer losses (vqrae_rae.md 2.1-2.2). Defaults: RAE's stage-1 recipe with L2 instead of L1.

    ASSUMPTIONS (paper leaves them open): lpips_weight 1.0, gan_weight 0.75 with the adaptive VQGAN
    rule, discriminator hinge loss, disc/GAN start steps at RAE's epochs 6/8 of ImageNet at batch 512
    (about 2.5k steps per epoch), distill_weight 1.0 ([VQ-ON], unverified), quant_weight 1.0.
    """

    pixel_loss: Literal["l2", "l1"] = "l2"
    pixel_weight: float = 1.0
    lpips_weight: float = 1.0
    lpips_path: str | None = None  # converted LPIPS-VGG weights; None: the LPIPS term is off
    gan_weight: float = 0.75
    gan_start_step: int = 20000
    disc_start_step: int = 15000
    adaptive_weight: bool = True
    max_adaptive_weight: float = 1e4
    disc_fake_8bit: bool = True
    quant_weight: float = 1.0
    distill_weight: float = 1.0
    disc: DiscConfig = DiscConfig()

    def __post_init__(self):
        if self.pixel_loss not in ("l2", "l1"):
            raise ValueError(f"LossConfig.pixel_loss must be l2|l1, got {self.pixel_loss!r}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | LossConfig | None) -> LossConfig:
        return _from_dict(cls, d, nested={"disc": DiscConfig})


@dataclasses.dataclass(frozen=True)
class VQRAEConfig:
    encoder: EncoderConfig = EncoderConfig()
    quantizer: SimVQConfig = SimVQConfig()
    decoder: DecoderConfig = DecoderConfig()
    loss: LossConfig = LossConfig()
    with_teacher: bool = True  # stage-2 self-distillation teacher (a frozen copy of the encoder)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | VQRAEConfig | None) -> VQRAEConfig:
        return _from_dict(
            cls,
            d,
            nested={
                "encoder": EncoderConfig,
                "quantizer": SimVQConfig,
                "decoder": DecoderConfig,
                "loss": LossConfig,
            },
        )
