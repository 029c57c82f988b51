"""The suite's hypothesis strategies are the package's public ones (`conversion.testing.strategies`):
one implementation for this suite and downstream suites.  Re-exported here so tests keep `from . import strategies as S`.
"""
from conversion.testing.strategies import *  # noqa: F401,F403
from conversion.testing.strategies import CONTAINERS, DIM_CHOICES, DTYPES, MAX_DEPTH, wrap  # noqa: F401
