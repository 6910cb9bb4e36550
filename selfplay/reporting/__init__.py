"""What a run shows: round summaries and the end-of-run table, the markdown and HTML reports (Jinja2 templates
in `templates/`), a round's conclusion, the artifacts published to Prefect, and run history."""
