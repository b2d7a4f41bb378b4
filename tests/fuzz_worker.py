"""One fuzz worker (tests/test_image_fuzz.py): reads image paths from stdin, one per line, and
writes one JSON line per path: how `preprocess(strict=True)` ended, for the path and its bytes.

  {"outcome": "ok"} | {"outcome": "input_error", "code": ...} | {"outcome": "exception", "error": ...}

Any exception that is not an `InputError`, a non-finite or wrongly shaped tensor, or a path and
its bytes that end differently is an "exception". Hangs and crashes are the parent's to see.
"""
import json
import resource
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # this checkout's edge_app

import numpy as np  # noqa: E402

from edge_app import preprocess  # noqa: E402
from edge_app.errors import InputError  # noqa: E402

MEMORY_LIMIT = 4 << 30     # a runaway allocation becomes a MemoryError, reported, not a dead machine
SPEC = preprocess.InputSpec(size=64, channels=3, normalisation="symmetric", contrast="clahe",
                            borders="trim")


def outcome(source) -> dict:
    try:
        x = preprocess.preprocess(source, SPEC, strict=True)
    except InputError as e:
        return {"outcome": "input_error", "code": e.code}
    if x.shape != (SPEC.size, SPEC.size, SPEC.channels) or not np.isfinite(x).all():
        raise AssertionError(f"bad model input: shape {x.shape}, finite {np.isfinite(x).all()}")
    return {"outcome": "ok", "sum": float(x.sum(dtype=np.float64))}


def main() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    for line in sys.stdin:
        path = Path(line.rstrip("\n"))
        try:
            result = outcome(path)
            from_bytes = outcome(path.read_bytes())
            if from_bytes != result:
                raise AssertionError(f"the path gives {result}, its bytes {from_bytes}")
        except Exception as e:  # noqa: BLE001 - every other exception is a finding
            result = {"outcome": "exception", "error": f"{type(e).__name__}: {e}",
                      "traceback": traceback.format_exc()}
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
