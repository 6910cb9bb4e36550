"""How stages run: child processes that never outlive their owner, a stage in its own process, GPU turns and
"skip if complete" (Prefect plumbing), the run directory and its record, shutdown on a signal, the temporary Prefect
server, and the hook points developer tools attach to."""
