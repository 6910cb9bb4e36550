"""Stage 5's logic, pure: two models' answers as comparisons, win rates and held-out accuracy, the gate, the
statistics (Wilson intervals, McNemar) and data quality, and pathologies of generated text."""
