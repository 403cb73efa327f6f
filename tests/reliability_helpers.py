"""Shared pieces of the reliability suite (tests/test_reliability_*.py).

The fault tests start, kill and restart the trainer many times. A fresh Python process pays about
10 s of imports (TensorFlow through clu) before it trains, so the suite runs trainer processes
through a *fork server*: ``python tests/reliability_helpers.py serve <devices> <cache>`` imports
JAX, the trainer and the toy family once, without starting a JAX backend, and forks one child per
run. Each child is a real process with its own PID: it initialises its own backend, writes its own
checkpoints and is killed with a real SIGKILL; a restarted child knows nothing of the killed one
but what is on disk. A persistent XLA compilation cache (one folder per test module) spares the
children the recompiles, which do not change the executables (the kill test checks bit-identity).

Protocol (one JSON object per line on stdin / stdout):
    {"run": {...}}          -> {"pid": pid}          fork a child (fields: see _child)
    {"poll": pid}           -> {"returncode": rc}    rc is None while the child runs
    {"wait": pid}           -> {"returncode": rc}    blocks; rc = -signal for a killed child
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def child_env(devices: int) -> dict[str, str]:
    """Environment of a trainer process with ``devices`` fake CPU devices."""
    env = dict(os.environ)
    env["JAX_PLATFORMS"] = "cpu"
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "host_platform_device_count" not in f]
    env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"])
    env["PYTHONPATH"] = os.pathsep.join([REPO, HERE])
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return env


def harmon_smoke_config():
    """configs/shapes_harmon.py:smoke (the config folder is not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "shapes_harmon_config", os.path.join(REPO, "configs", "shapes_harmon.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config("smoke")


def apply_overrides(config, overrides: Mapping[str, Any]):
    """Dotted-key overrides (``{"faults.kill_at_step": 9}``); new keys may be added."""
    import ml_collections

    for dotted, value in overrides.items():
        node = config
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node[p]
        if isinstance(value, dict):
            value = ml_collections.ConfigDict(value)
        elif isinstance(value, list):
            value = tuple(value)
        node[leaf] = value
    return config


class ForkServer:
    """Client side of the fork server (see the module docstring)."""

    def __init__(self, devices: int = 8, cache_dir: str | None = None, timeout: float = 180):
        self.devices = devices
        self._children: set[int] = set()
        self._status: dict[int, int] = {}  # exit statuses of reaped children
        t0 = time.monotonic()
        self._proc = subprocess.Popen(
            [sys.executable, __file__, "serve", str(devices), cache_dir or ""],
            env=child_env(devices),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        ready = self._read(timeout)
        assert ready.get("ready"), ready
        self.startup_seconds = time.monotonic() - t0

    def _read(self, timeout: float = 600) -> dict:
        line = self._proc.stdout.readline()
        if not line:
            raise RuntimeError(f"fork server exited with {self._proc.wait(timeout)}")
        return json.loads(line)

    def _ask(self, request: dict) -> dict:
        self._proc.stdin.write(json.dumps(request) + "\n")
        self._proc.stdin.flush()
        return self._read()

    def start(
        self,
        log_path: str,
        *,
        workdir: str | None = None,
        overrides: Mapping[str, Any] | None = None,
        argv: Sequence[str] | None = None,
        config_fn: str = "toy_family:toy_config",
    ) -> int:
        """Forks a trainer child. With ``argv`` it runs ``python -m unified_mm.main argv``;
        otherwise ``train_and_evaluate`` of ``config_fn()`` plus ``overrides`` in ``workdir``."""
        run = {"log": str(log_path), "config_fn": config_fn}
        if argv is not None:
            run["argv"] = [str(a) for a in argv]
        else:
            run.update(workdir=str(workdir), overrides=dict(overrides or {}))
        pid = self._ask({"run": run})["pid"]
        self._children.add(pid)
        return pid

    def poll(self, pid: int) -> int | None:
        if pid in self._status:
            return self._status[pid]
        rc = self._ask({"poll": pid})["returncode"]
        if rc is not None:
            self._children.discard(pid)
            self._status[pid] = rc
        return rc

    def kill(self, pid: int, sig: int = signal.SIGKILL) -> bool:
        """Signals a child unless it was already reaped (its PID could then be reused)."""
        if pid in self._status:
            return False
        os.kill(pid, sig)  # a finished but unreaped child is a zombie: harmless
        return True

    def wait(self, pid: int, timeout: float = 300) -> int:
        deadline = time.monotonic() + timeout
        while (rc := self.poll(pid)) is None:
            if time.monotonic() > deadline:
                self.kill(pid)
                self.wait(pid, timeout=30)
                raise TimeoutError(f"trainer child {pid} ran longer than {timeout} s")
            time.sleep(0.02)
        return rc

    def run(self, log_path: str, timeout: float = 300, **kwargs) -> int:
        """Starts a child and waits for it; returns its exit status."""
        return self.wait(self.start(log_path, **kwargs), timeout)

    def close(self) -> None:
        for pid in list(self._children):
            try:
                self.kill(pid)
            except ProcessLookupError:
                pass
        if self._proc.poll() is None:
            self._proc.stdin.close()
            try:
                self._proc.wait(30)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()


def run_reference(server: ForkServer, workdir, overrides: Mapping[str, Any]) -> str:
    """One uninterrupted run in `workdir` (its compilations fill the server's cache for the
    interrupted runs that follow); fails with the log's tail when it does not exit 0."""
    log = os.path.join(str(workdir), "life.log")
    rc = server.run(log, workdir=str(workdir), overrides=overrides)
    assert rc == 0, read_log(log)[-3000:]
    return str(workdir)


def read_log(path: str) -> str:
    with open(path, errors="replace") as f:
        return f.read()


def raw_metric_rows(workdir: str) -> list[dict]:
    """Every row of metrics.jsonl in write order, replays after a resume included."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def checkpoint_listing(workdir: str) -> tuple[list[int], list[str]]:
    """(finalized step directories, leftover temporary directories) under workdir/checkpoints."""
    root = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(root):
        return [], []
    names = os.listdir(root)
    return sorted(int(n) for n in names if n.isdigit()), sorted(n for n in names if "tmp" in n)


def restore_items(workdir: str, step: int, items: Sequence[str] = ("params",)) -> dict:
    """Items of one checkpoint as numpy trees (in the calling, already-initialised process)."""
    import jax
    import numpy as np
    import orbax.checkpoint as ocp

    mgr = ocp.CheckpointManager(
        os.path.join(workdir, "checkpoints"), options=ocp.CheckpointManagerOptions(read_only=True)
    )
    try:
        out = mgr.restore(
            step, args=ocp.args.Composite(**{k: ocp.args.StandardRestore() for k in items})
        )
        return {k: jax.tree.map(np.asarray, out[k]) for k in items}
    finally:
        mgr.close()


def flat(tree) -> dict[str, Any]:
    import jax

    return {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


# ------------------------------------------------------------------------- dirty data

# Every way a record can fail that a test can produce from bytes on disk (records.REASONS but
# transform_error, the catch-all for unexpected exceptions in the transforms).
DIRTY_KINDS = (
    "read_error",
    "malformed_record",
    "non_utf8_text",
    "missing_caption",
    "decode_error",
    "empty_image",
    "bad_channels",
    "oversized_image",
)
MAX_PIXELS = 128 * 128  # data.max_image_pixels of the dirty-data configs
_MARK = b"#corrupt-me#"


def _png(array) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _bad_record(kind: str, rng) -> bytes:
    import numpy as np

    from unified_mm.data import records

    good = _png(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
    if kind == "malformed_record":
        return b"\x00 not a record"
    if kind == "non_utf8_text":
        head = b'{"image_format": "raw", "shape": [2, 2, 3], "caption": "a \xff\xfe circle"}'
        return records.MAGIC + len(head).to_bytes(4, "little") + head + bytes(12)
    if kind == "missing_caption":
        return records.encode_record(good, caption=None, image_format="png")
    if kind == "decode_error":
        return records.encode_record(
            good[: len(good) // 2], caption="a red circle", image_format="png"
        )
    if kind == "empty_image":
        return records.encode_record(np.zeros((0, 32, 3), np.uint8), caption="a red circle")
    if kind == "bad_channels":
        return records.encode_record(np.zeros((32, 32, 4), np.uint8), caption="a red circle")
    if kind == "oversized_image":
        big = _png(np.zeros((256, 256, 3), np.uint8))  # 65536 px > MAX_PIXELS
        return records.encode_record(big, caption="a red circle", image_format="png")
    if kind == "read_error":  # a good record whose stored bytes get damaged after writing
        return records.encode_record(
            good, caption="a red circle", image_format="png", meta={"m": _MARK.decode()}
        )
    raise ValueError(kind)


def write_records(
    path: str, n: int, *, bad_per_kind: int = 0, kinds=DIRTY_KINDS, seed: int = 0
) -> dict:
    """An ArrayRecord file of n records, ``bad_per_kind`` of them corrupted in each of ``kinds``
    (at seeded random positions); returns {kind: [record indices]}."""
    import numpy as np
    from array_record.python.array_record_module import ArrayRecordWriter

    from unified_mm.data import records

    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    bad = {
        k: sorted(int(i) for i in order[j * bad_per_kind : (j + 1) * bad_per_kind])
        for j, k in enumerate(kinds)
    }
    kind_of = {i: k for k, idx in bad.items() for i in idx}
    colours = ("red", "green", "blue", "yellow")
    shapes = ("circle", "square", "triangle")
    writer = ArrayRecordWriter(path, "group_size:1,uncompressed")  # one chunk per record
    for i in range(n):
        if i in kind_of:
            writer.write(_bad_record(kind_of[i], rng))
            continue
        colour, shape = colours[i % 4], shapes[i % 3]
        writer.write(
            records.encode_record(
                _png(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)),
                caption=f"a {colour} {shape}",
                qa=[(f"what colour is the {shape}?", colour)],
                image_format="png",
            )
        )
    writer.close()
    if bad.get("read_error"):  # flip bytes inside each marked chunk: its hash no longer matches
        data = bytearray(open(path, "rb").read())
        start = 0
        while (pos := data.find(_MARK, start)) >= 0:
            data[pos : pos + len(_MARK)] = b"X" * len(_MARK)
            start = pos + 1
        with open(path, "wb") as f:
            f.write(bytes(data))
    return bad


def pipeline_toy_config(
    sources: Mapping[str, str],
    *,
    steps=(3, 3),
    max_bad_fraction: float = 0.05,
    mixtures: Mapping[str, Mapping[str, float]] | None = None,
):
    """The toy family fed by the real data pipeline from ArrayRecord ``sources`` {name: path};
    ``mixtures`` {task: {source: weight}} (default: every source, equal weights, both tasks)."""
    from toy_family import toy_config

    from unified_mm.data.config import default_data_config
    from unified_mm.data.sources import source_config

    c = toy_config(steps=steps)
    c.family = "toy_pipeline"
    for name in c.stage_order:
        c.stages[name].task_batch = {"t2i": 32, "i2t": 16}
        c.stages[name].image_size = 32
    data = default_data_config()
    data.sources = {n: source_config("array_record", path=str(p)) for n, p in sources.items()}
    data.mixtures = mixtures or {t: {n: 1.0 for n in sources} for t in ("t2i", "i2t")}
    data.max_image_pixels = MAX_PIXELS
    data.max_bad_fraction = max_bad_fraction
    data.min_records_for_check = 40
    data.max_text_len = 16
    data.max_und_len = 24
    data.image_tokens = 4
    data.threads = 2
    c.data = data
    return c


def _register_pipeline_toy() -> None:
    import jax
    import jax.numpy as jnp
    from toy_family import ToyFamily

    from unified_mm import families

    class PipelineToyFamily(ToyFamily):
        """ToyModel on 8 features of real pipeline batches (image statistics, token counts)."""

        tasks = ("t2i", "i2t")

        def make_train_iterator(self, stage, *, seed, process_index, process_count):
            from unified_mm.data.config import with_overrides
            from unified_mm.data.pipeline import make_train_iterator

            return make_train_iterator(
                with_overrides(self.config.data, stage.data),
                task_batch=dict(stage.task_batch),
                image_size=stage.image_size,
                seed=seed,
                process_index=process_index,
                process_count=process_count,
            )

        def abstract_batch(self, stage, batch_per_task):
            sds, f32, i32 = jax.ShapeDtypeStruct, jnp.float32, jnp.int32
            s, data = stage.image_size, self.config.data
            out = {}
            for task, n in batch_per_task.items():
                t = int(data.max_text_len if task == "t2i" else data.max_und_len)
                out[task] = {
                    "image": sds((n, s, s, 3), f32),
                    "input_ids": sds((n, t), i32),
                    "attention_mask": sds((n, t), i32),
                }
                if task == "i2t":
                    out[task]["labels"] = sds((n, t), i32)
            return out

        def loss(self, model, batch, key, *, step, stage):
            terms = {}
            for task, b in batch.items():
                img = b["image"]
                ids = b["input_ids"].astype(jnp.float32) / 100.0
                mask = b["attention_mask"].astype(jnp.float32)
                x = jnp.stack(
                    [
                        img[..., 0].mean((1, 2)),
                        img[..., 1].mean((1, 2)),
                        img[..., 2].mean((1, 2)),
                        img.std((1, 2, 3)),
                        ids.mean(1),
                        mask.mean(1),
                        img[:, :16].mean((1, 2, 3)),
                        img[:, 16:].mean((1, 2, 3)),
                    ],
                    axis=1,
                )
                y = jnp.sin(3.0 * img[:, ::2, ::2].mean((1, 2, 3)))
                terms[f"loss/{task}"] = jnp.mean((model(x) - y) ** 2)
            return sum(terms.values()), terms

    families.FAMILIES["toy_pipeline"] = lambda: PipelineToyFamily


# ----------------------------------------------------------------------------------- server


def _child(run: dict, cache_dir: str) -> int:
    """Body of a forked child; returns its exit status."""
    import logging

    fd = os.open(run["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    import jax

    if cache_dir:
        jax.config.update("jax_compilation_cache_dir", cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    if "argv" in run:
        from absl import app

        from unified_mm import main as cli

        try:
            app.run(lambda argv: sys.exit(cli.main(argv)), argv=["unified_mm.main", *run["argv"]])
        except SystemExit as e:
            return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        return 0
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stdout,
        force=True,
        format="%(asctime)s.%(msecs)03d %(name)s] %(message)s",
        datefmt="%H:%M:%S",
    )
    logging.getLogger("absl").setLevel(logging.WARNING)
    import importlib

    from unified_mm.train.train import main_entry

    module, fn = run["config_fn"].split(":")
    config = apply_overrides(getattr(importlib.import_module(module), fn)(), run["overrides"])
    code = main_entry(config, run["workdir"])
    print("TRAINING DONE" if code == 0 else f"EXIT {code}", flush=True)
    return code


def serve(cache_dir: str) -> None:
    # Import everything heavy once; no JAX backend may start here (children must own theirs).
    import clu.metric_writers  # noqa: F401  (TensorFlow: most of the start-up time)
    import jax  # noqa: F401
    import orbax.checkpoint  # noqa: F401
    import toy_family  # noqa: F401

    import unified_mm.data.pipeline  # noqa: F401
    import unified_mm.main  # noqa: F401
    import unified_mm.train.train  # noqa: F401
    from unified_mm import families

    for name in list(families.FAMILIES):  # family modules (Harmon, VQRAE) import lazily
        try:
            families.FAMILIES[name]()
        except Exception:
            pass
    from jax._src import xla_bridge

    assert not xla_bridge._backends, "the fork server must not initialise a JAX backend"
    out = sys.stdout
    out.write(json.dumps({"ready": True}) + "\n")
    out.flush()
    for line in sys.stdin:
        request = json.loads(line)
        if "run" in request:
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    code = _child(request["run"], cache_dir)
                except BaseException:
                    import traceback

                    traceback.print_exc()
                finally:
                    sys.stdout.flush()
                    sys.stderr.flush()
                    os._exit(code)
            reply = {"pid": pid}
        else:
            pid = request.get("poll", request.get("wait"))
            done, status = os.waitpid(pid, 0 if "wait" in request else os.WNOHANG)
            rc = None if done == 0 else os.waitstatus_to_exitcode(status)
            reply = {"returncode": rc}
        out.write(json.dumps(reply) + "\n")
        out.flush()


_register_pipeline_toy()

if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        sys.path.insert(0, HERE)
        serve(sys.argv[3] if len(sys.argv) > 3 else "")
