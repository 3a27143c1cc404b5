"""Reports: records to tables (plain text, CSV, Markdown, HTML) and plots."""
