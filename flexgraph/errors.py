"""User-facing errors.

A ``FlexgraphError`` carries one line that names what is wrong and how to fix it.  The
CLI prints it as ``error: <message>`` and exits with status 2; it never shows a
traceback for one.  Anything else escaping to the CLI is a bug in flexgraph.
"""

from __future__ import annotations


class FlexgraphError(Exception):
    """An error caused by the user's input or environment, with a one-line message."""

    def __init__(self, message: str):
        # Keep it to one line: callers sometimes interpolate multi-line text.
        super().__init__(" ".join(str(message).split()))


class ModelError(FlexgraphError):
    """A model argument, config or weight store is missing, unsupported or damaged."""


class PlanError(FlexgraphError):
    """A plan file is unreadable, or a policy cannot be planned."""


class RuleViolation(PlanError):
    """A traversal path breaks one of the four rules of ``DESIGN.md``."""

    def __init__(self, rule: int, node, message: str, tier: str | None = None,
                 needed: int | None = None, capacity: int | None = None):
        self.rule, self.node, self.tier = rule, node, tier
        self.needed, self.capacity = needed, capacity
        super().__init__(f"rule {rule} broken at {node}: {message}")


class ExecutionError(FlexgraphError):
    """A run could not proceed (bad prompts file, full disk, interrupted, ...)."""
