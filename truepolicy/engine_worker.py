"""Child process of ``truepolicy.sglang_process.run_offline_engine``: one offline SGLang Engine.

Reads a JSON job on stdin (model path, device, Engine keyword arguments, generate requests), runs
them, and prints one JSON line with the outputs on stdout. Never import this in a parent process
you care about: SGLang kills its parent tree when a scheduler crashes.
"""

from __future__ import annotations

import json
import sys


def main() -> int:
    job = json.loads(sys.stdin.read())
    import sglang

    kwargs = {"log_level": "error", "skip_tokenizer_init": True, **job["engine_kwargs"]}
    if job["device"] == "cpu":
        kwargs.setdefault("attention_backend", "torch_native")
    engine = sglang.Engine(model_path=job["model_path"], device=job["device"], **kwargs)
    try:
        outputs = [engine.generate(**request) for request in job["requests"]]
    finally:
        engine.shutdown()
    sys.stdout.write(json.dumps(outputs) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
