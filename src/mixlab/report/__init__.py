"""Comparing methods and reporting runs: ``mixlab compare`` and ``mixlab report``.

- ``runs``: read run dirs (``metrics.jsonl``, ``summary.json``, ``config.toml``).
- ``table``: the comparison table (paired differences from a baseline), Markdown and CSV.
- ``compare``: plan and schedule the runs of a comparison as parallel subprocesses.
- ``plots``: the report's figures (matplotlib, Agg backend).
- ``html``: the self-contained HTML report and its Markdown summary.
"""
