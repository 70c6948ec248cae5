"""Tables and plots of run results."""

from contsparse.reports.table import per_layer_table, print_summary, summary_table

__all__ = ["per_layer_table", "print_summary", "summary_table"]
