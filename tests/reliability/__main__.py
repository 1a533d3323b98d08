"""The whole fault campaign as one command: ``python -m tests.reliability`` (from the repository).

Runs ``tests/reliability`` with the campaign's full matrices (marker ``campaign``, deselected in
a normal ``pytest`` run) and prints the figures at the end; ``$SEECHANGE_CAMPAIGN_FIGURES`` names
a file to write them to as JSON.  Extra arguments go to pytest.
"""

import sys

import pytest

if __name__ == "__main__":
    sys.exit(pytest.main(["tests/reliability", "-m", "campaign or not campaign", "-p", "no:cacheprovider",
                          *sys.argv[1:]]))
