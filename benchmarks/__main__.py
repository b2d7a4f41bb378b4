"""python -m benchmarks [pytest options]: `pytest benchmarks` with the native libraries' logs
filtered off stderr (edge_app.native_logs; CXR_EDGE_VERBOSE=1 shows them)."""
import sys

import pytest

from edge_app import native_logs

if __name__ == "__main__":
    native_logs.quiet()
    sys.exit(pytest.main(["benchmarks", *sys.argv[1:]]))
