"""Runs the toy trainer in a child process (for kill / SIGTERM / device-count tests)."""

import os
import sys

if __name__ == "__main__":
    devices = sys.argv[3] if len(sys.argv) > 3 else "8"
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    import json
    import logging

    logging.basicConfig(level=logging.INFO, stream=sys.stdout, force=True)
    sys.path.insert(0, os.path.dirname(__file__))
    import ml_collections
    from toy_family import toy_config

    from unified_mm.train.train import train_and_evaluate

    overrides = json.loads(sys.argv[2])
    config = toy_config()
    for dotted, value in overrides.items():
        node = config
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = ml_collections.ConfigDict(value) if isinstance(value, dict) else value
    train_and_evaluate(config, sys.argv[1])
    print("TRAINING DONE", flush=True)
