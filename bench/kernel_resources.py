"""`python -m bench.kernel_resources`: prism_fast.testing.kernel_resources (which the tests run)."""

import sys

from prism_fast.testing.kernel_resources import main

if __name__ == "__main__":
    sys.exit(main())
