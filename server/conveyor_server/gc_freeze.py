"""Keep the cyclic garbage collector's full collections off what the server built at startup.

Python's full collection walks every object it tracks. Most of a running server's are the modules,
protobuf descriptors, engines and caches it built at startup, which never become garbage, so each
full collection held the event loop, and every stream on the replica, for about 30 ms (up to 47):
over 60,000 noop tasks under `bench/compare.py --matched`, nine full collections took 266 ms of the
server's 530 ms of collecting. `gc.freeze()` once the server is up moves those objects to a
generation no collection walks: in the same benchmark the eight full collections after startup took
0.9-3.6 ms each (13 ms in all), the longest pause of any collection 2.4-5.9 ms. The thresholds stay
Python's: raising the young one (2,000, 10,000) collected less in all but made the middle
collections walk more at a time (pauses of 9-16 ms).

Only `conveyor serve` does this, once its listeners are up: it is a decision for the whole
process, which a library or a test must not make for its host.
"""

from __future__ import annotations

import gc


def freeze_startup_objects() -> int:
    """Collect what startup left behind, then exempt the survivors from every later collection;
    returns how many objects were frozen."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
