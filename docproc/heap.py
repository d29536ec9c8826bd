"""The process's long-lived objects, kept out of the garbage collector's way.

Start-up builds what lives as long as the process: modules, clients, settings, compiled
schemas (about 140,000 objects where all the functions' services are built). The cyclic
collector walks all of them again on every full collection, and the storage function's PDF
inspection allocates enough short-lived containers to bring one about every ten documents:
0.28 ms of CPU per document, 7% of the function's (bench/README.md, Findings 21). Freezing
them once the process is ready leaves the collector only what was made since, which is
where garbage can be.
"""

from __future__ import annotations

import gc


def settle() -> int:
    """Collect start-up's garbage, then freeze what is left; how many objects were frozen.
    Call once per process, when it is ready to work (after any fork)."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
