"""The graph pass and its replacement table."""

from .api import DEFAULT_BETA, ConvertOptions, convert, convert_with_options
from .report import ConversionReport, Skipped
from .rules import DEFAULT_RULES, ReplacementRule, RuleContext, match_function, match_method, match_module
from .tracing import LcnnGraphModule, trace

__all__ = [
    "DEFAULT_BETA",
    "DEFAULT_RULES",
    "ConversionReport",
    "ConvertOptions",
    "LcnnGraphModule",
    "ReplacementRule",
    "RuleContext",
    "Skipped",
    "convert",
    "convert_with_options",
    "match_function",
    "match_method",
    "match_module",
    "trace",
]
