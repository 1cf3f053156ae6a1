"""The HTTP side: the aiohttp app and handlers, OpenAI shapes, the engine thread's worker, Prometheus metrics."""
