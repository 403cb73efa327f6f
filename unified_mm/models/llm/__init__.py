"""models/llm."""
