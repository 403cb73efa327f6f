"""Reliability 6 (inputs): bad checkpoint files to import and prompts longer than the context.

A pickle that is not a plain tensor dict is refused (a crafted payload must not run: the test
proves the payload is live, then that the loader never runs it), a state_dict with missing,
extra or mis-shaped keys is one ValueError naming them all (through the trainer's import of
``config.init`` checkpoints), and a prompt longer than the model's context is one clear error.
(The mesh/topology and other-architecture cases go through ``python -m unified_mm.main`` in
test_reliability_checkpoints.py.)
"""

import pickle

import ml_collections
import numpy as np
import pytest
from reliability_helpers import harmon_smoke_config

torch = pytest.importorskip("torch", reason="needs torch (the 'convert' extra)")

from unified_mm.models.harmon import convert  # noqa: E402


class _Payload:
    """Unpickling it runs code: it writes a marker file."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def _one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert msg and "\n" not in msg, msg
    return msg


def test_crafted_pickle_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    zipped = tmp_path / "evil.pth"
    torch.save({"w": torch.zeros(2), "x": _Payload(str(marker))}, zipped)
    legacy = tmp_path / "evil_legacy.ckpt"
    legacy.write_bytes(pickle.dumps({"model": {"w": _Payload(str(marker))}}, protocol=2))
    for path in (zipped, legacy):
        with pytest.raises(ValueError) as err:
            convert.load_torch_file(path)
        assert "refusing to load" in _one_line(err) and "arbitrary unpickling" in str(err.value)
    assert not marker.exists(), "the pickle payload was executed"
    # The payload is live: an unsafe load would have run it.
    torch.load(zipped, weights_only=False)
    assert marker.read_text() == "pwned"


def test_pickles_that_are_not_plain_tensor_dicts(tmp_path):
    cases = {
        "list.pth": ([torch.zeros(2)], "does not hold a state_dict (got list)"),
        "str_entry.pth": (
            {"w": torch.zeros(2), "note": "hi"},
            "entry 'note' is a str, not a tensor",
        ),
        "nested.pth": ({"w": {"v": torch.zeros(2)}}, "entry 'w' is a dict, not a tensor"),
    }
    for name, (obj, want) in cases.items():
        torch.save(obj, tmp_path / name)
        with pytest.raises(ValueError) as err:
            convert.load_torch_file(tmp_path / name)
        assert want in _one_line(err), (name, str(err.value))
    (tmp_path / "weights.npy").write_bytes(b"\x93NUMPY")
    with pytest.raises(ValueError, match="unsupported checkpoint suffix '.npy'"):
        convert.load_torch_file(tmp_path / "weights.npy")


def _init_config(harmon_checkpoint: str) -> ml_collections.ConfigDict:
    config = harmon_smoke_config()
    config.init = ml_collections.ConfigDict(
        dict(harmon_checkpoint=harmon_checkpoint, vae_checkpoint="", llm_safetensors="")
    )
    return config


def test_official_checkpoint_with_bad_keys_is_one_error(tmp_path):
    """Through the trainer's import (HarmonFamily.pretrained_params, run before training)."""
    from unified_mm.families.harmon import HarmonFamily

    cfg = HarmonFamily(_init_config("")).model_cfg
    sd = dict(_good(cfg))
    del sd["mar.z_proj.bias"]
    sd["mar.extra_head.weight"] = np.zeros((2, 2), np.float32)
    sd["proj_in.0.weight"] = np.zeros((7, 3), np.float32)
    torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, tmp_path / "harmon.pth")
    family = HarmonFamily(_init_config(str(tmp_path / "harmon.pth")))
    with pytest.raises(ValueError) as err:
        family.pretrained_params()
    msg = _one_line(err)
    assert msg.startswith("Harmon checkpoint does not match the config: ")
    for needle in (
        "missing keys ['mar.z_proj.bias']",
        "unexpected keys ['mar.extra_head.weight']",
        "wrong shapes ['proj_in.0.weight (7, 3) (expected",
    ):
        assert needle in msg, (needle, msg)
    # The unmodified dict imports cleanly (so the errors above are the edits, nothing else).
    torch.save({k: torch.from_numpy(v) for k, v in _good(cfg).items()}, tmp_path / "good.pth")
    assert HarmonFamily(_init_config(str(tmp_path / "good.pth"))).pretrained_params()
    # A crafted pickle named as the init checkpoint never runs either.
    marker = tmp_path / "pwned"
    torch.save({"w": _Payload(str(marker))}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="refusing to load"):
        HarmonFamily(_init_config(str(tmp_path / "evil.pth"))).pretrained_params()
    assert not marker.exists()
    print(f"\nbad state_dict: {msg[:300]}")


def _flat(tree, prefix=()):
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def _unflat(flat):
    out: dict = {}
    for path, v in flat.items():
        node = out
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = v
    return out


def _good(cfg):
    zeros = {
        k: np.zeros(v.shape, np.float32) for k, v in _flat(convert.abstract_params(cfg)).items()
    }
    return convert.official_from_harmon_params(_unflat(zeros), cfg)[0]


def test_prompt_longer_than_the_context_is_one_error():
    from unified_mm.data.tokenizers import WordLevelTokenizer
    from unified_mm.eval import harmon_inference as inf

    tok = WordLevelTokenizer.from_file()
    config = harmon_smoke_config()
    limits = inf.model_limits(config)
    long = " and ".join(["a red circle"] * 12)
    with pytest.raises(ValueError) as err:
        inf.encode_prompts(tok, ["a red circle", long], max_text_len=limits["max_text_len"])
    msg = _one_line(err)
    assert "longer than the model's text context (data.max_text_len = 24)" in msg, msg
    with pytest.raises(ValueError) as err:
        inf.understanding_prompts(
            tok,
            [" and ".join(["a red circle"] * 30) + "?"],
            image_tokens=20,
            max_prompt_len=limits["max_prompt_len"],
        )
    msg2 = _one_line(err)
    assert "longer than the model's understanding context (data.max_und_len = 112)" in msg2, msg2
    # Prompts that fit pass.
    assert inf.encode_prompts(tok, ["a red circle"], max_text_len=limits["max_text_len"])
    print(f"\nprompt too long: {msg}\nquestion too long: {msg2}")
