"""Static files nginx loads: the njs module that hashes the bearer token, shipped as package data (llmgate_nginx)."""
