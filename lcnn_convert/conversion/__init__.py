"""The graph pass and its replacement table."""

from .api import DEFAULT_BETA, CalibrationData, ConvertOptions, convert, convert_with_options, split_examples
from .report import BetaChoice, ConversionReport, Skipped
from .rules import DEFAULT_RULES, ReplacementRule, RuleContext, match_function, match_method, match_module
from .tracing import LcnnGraphModule, trace

__all__ = [
    "DEFAULT_BETA",
    "DEFAULT_RULES",
    "BetaChoice",
    "CalibrationData",
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
    "split_examples",
    "trace",
]
