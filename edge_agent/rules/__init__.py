"""Rules: deterministic functions of (state, device event, clock) that emit business events.

Built-in rule kinds, by the ``kind`` of their config (``config.RuleConfig`` is the
discriminated union of their config models). A new kind is one module with one class
implementing ``rules.base.Rule``, listed here and in ``config.RuleConfig``.
"""

from __future__ import annotations

from typing import Any

from .base import Rule
from .correlate import Correlate
from .count import Count
from .map import Map

RULE_KINDS: dict[str, Any] = {"correlate": Correlate, "map": Map, "count": Count}


def build_rule(cfg: Any, *, site: str) -> Rule:
    return RULE_KINDS[cfg.kind](cfg, site=site)
