"""Stage 2's engine: comparisons judged in both orders and the rule that combines them (`verdicts`, pure), where
a judge runs (`runner`), the judge backends (`local`, `endpoint`) with their prompt, reply parsing and cache, and
the verifiers that decide where an answer can be checked."""
