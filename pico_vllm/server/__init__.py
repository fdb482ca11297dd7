"""``pico-vllm serve``: an OpenAI-compatible HTTP server over the engine (one thread per model)."""
