"""Running many runs: planning, launching and scheduling them, and the pipelines built on that.

- ``spec``: one run (``RunSpec``) and what to do with its dir (reuse, resume, start afresh).
- ``launch``: the ``mixlab train`` subprocess launcher, the inline launcher, ``MALLOC_ENV``,
  how many runs at once with how many threads.
- ``scheduler``: ``run_all`` (J runs at a time, in dependency order) and ``Progress``.
- ``compare``: ``mixlab compare``'s plan (methods x seeds), its runs and its tables.
- ``sweep``, ``sweep_fit``: ``mixlab sweep``'s proxy runs on many mixtures and the mixture fitted
  from them (data mixing law, RegMix, best run).
- ``doremi``: DoReMi's three chained stages (reference, proxy, final) and their accounting.
- ``demo``: ``mixlab demo``: the built-in corpus, the comparison of every dynamic mixer, the report.
- ``lmo_runs``: reading runs for the LMO mixing laws (``mixlab.lmo``) and fitting them.

``mixlab.report`` renders (tables, plots, HTML) and reads finished runs; it never imports this
package. The commands in ``mixlab.commands`` parse arguments, call these and print.
"""
