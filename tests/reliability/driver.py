"""``python -m tests.reliability.driver '[[argv...], [argv...]]'``: run seechange commands one
after the other in one genuine process, stopping at the first that fails (its exit code)."""

import json
import sys

from pipeline.cli import main

if __name__ == "__main__":
    code = 0
    for argv in json.loads(sys.argv[1]):
        code = main(argv)
        if code:
            break
    sys.exit(code)
