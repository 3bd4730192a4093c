"""The report: the table beside the literature, its marks and caption, Markdown/LaTeX, figures."""
