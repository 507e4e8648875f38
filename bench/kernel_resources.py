"""`python -m bench.kernel_resources`: prism_fast.testing.kernel_resources (which the tests run)."""

import os
import sys

os.environ.pop("TRITON_INTERPRET", None)   # compiled kernels, not the interpreter's

from prism_fast.testing.kernel_resources import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
