"""Warming: keep what will be pulled next in the cache before anyone asks.

Selection (``rules``: which repositories, tags, platforms) is separate from
execution (``warm``: one reference through the pull service, within ``budget``);
``popularity`` counts what clients pull here; ``loop`` runs it all on a schedule
inside the node. See docs/configuration.md (``sync``) for the model.
"""

from mirror.sync.loop import SyncService, parse_reference
from mirror.sync.popularity import Popularity
from mirror.sync.warm import WarmJob, WarmResult

__all__ = ["Popularity", "SyncService", "WarmJob", "WarmResult", "parse_reference"]
