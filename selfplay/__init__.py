"""selfplay: workflow-orchestrated iterative DPO."""
