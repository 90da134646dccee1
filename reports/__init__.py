"""Capacity reports (Markdown, HTML, plots, JSON) and the CI regression gate."""
