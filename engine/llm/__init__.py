"""The LLM arm: cell sentences, prompts for zero/few-shot prediction, strict answer parsing, and the
chat backends (vLLM offline and any OpenAI-compatible HTTP endpoint)."""
