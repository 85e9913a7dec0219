"""Cost analysis: parameters and multiply-adds that count every op we run."""

from acmix.analysis.flops import MacsReport, count_macs, count_params

__all__ = ["MacsReport", "count_macs", "count_params"]
