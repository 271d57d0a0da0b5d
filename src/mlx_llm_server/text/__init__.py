"""Splits generated text into content, reasoning and tool calls (pure Python, no MLX)."""
