"""Stage 1's engine, and the evaluation's: completions from a policy, in this process (transformers and selfplay's fast
decoder) or through a server, and the evaluate stage's named generation jobs."""
