"""Runtime: the only stage that mutates modules. Sharded layers, collectives and their transports, the rewrite
of a model by a plan (``apply``), and its translation check on a meta copy (``verify``, ``fixups``)."""
