"""A fake vLLM server for tests, demos and benchmarks: the one part of llmgate that is not the product.

Nothing in controller/, authsvc/ or proxycore/ imports it; `llmgate fake-vllm` runs it as its own
program (`python -m fakevllm`).
"""
