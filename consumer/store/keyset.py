"""Keyset walks over uuid keys (chunks of ``key > last``): where the first chunk starts.

The nil UUID sorts before every other, so a walk starts at it with ``>=`` and goes on with
``>`` from the last key of each chunk. (``uuid.NIL`` only exists from Python 3.14.)
"""

from uuid import UUID

NIL = UUID(int=0)
