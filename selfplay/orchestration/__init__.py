"""Which rounds run, and whether a run may start: preflight (bad input refused before anything expensive),
the round loop's current checkpoint and early stop, and a lineage's ledger."""
