"""Reporting runs: ``mixlab report``, and the tables ``mixlab compare`` writes.

- ``runs``: read run dirs (``metrics.jsonl``, ``summary.json``, ``config.toml``).
- ``table``: the comparison table (paired differences from a baseline), Markdown and CSV.
- ``plots``: the report's figures (matplotlib, Agg backend).
- ``html``: the self-contained HTML report and its Markdown summary.
- ``lmo``, ``lmo_plots``: the LMO mixing-law analysis (its result, Markdown, JSON and figures).
- ``demo_table``: the demo's main table and the README's copy of it.

Planning and running runs is ``mixlab.orchestrate``'s; nothing here imports it.
"""
