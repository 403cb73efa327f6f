"""VQRAE model family (vqrae_rae.md): vision foundation encoders, SimVQ, ViT decoder, losses.

Modules: `config` (frozen dataclass configs), `siglip` / `dinov2` (encoders), `encoder_convert`
(HF safetensors / big_vision npz / DINO v1 weights), `resize` (torch-compatible), `simvq`,
`decoder`, `discriminator`, `lpips`, `losses`, `metrics`, `vqrae` (the tokenizer, stages 0-2) and
`unified` (stage 3: tokenizer + projector + Qwen2).
"""
