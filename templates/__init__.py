"""The jinja2 templates of nginx.conf and the /ui pages, shipped as package data (llmgate_templates)."""
