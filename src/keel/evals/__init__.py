"""The evaluation core: datasets, suites, the runner, scorers, statistics and CI gates."""

from keel.evals.client import EvalApiError, EvalClient
from keel.evals.compare import compare_runs, summarise
from keel.evals.datasets import DatasetFormatError, dump_items, item_from_trace, normalise_items, parse_items
from keel.evals.gate import gate_failures, junit_xml, markdown_summary
from keel.evals.runner import OutputCache, RunReport, execute_suite
from keel.evals.stats import PairedDelta, paired_bootstrap
from keel.evals.suite import Suite, SuiteError, load_suite, parse_suite

__all__ = [
    "DatasetFormatError",
    "EvalApiError",
    "EvalClient",
    "OutputCache",
    "PairedDelta",
    "RunReport",
    "Suite",
    "SuiteError",
    "compare_runs",
    "dump_items",
    "execute_suite",
    "gate_failures",
    "item_from_trace",
    "junit_xml",
    "load_suite",
    "markdown_summary",
    "normalise_items",
    "paired_bootstrap",
    "parse_items",
    "parse_suite",
    "summarise",
]
