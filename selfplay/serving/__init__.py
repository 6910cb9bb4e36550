"""Model servers and talking to them: a server process from start to stop, vLLM's LoRA API, GPU memory through
nvidia-smi, and the one OpenAI-compatible client."""
