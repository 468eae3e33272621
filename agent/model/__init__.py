"""What the agent knows about the model it talks to: `qwen2_audio` is the only module that
knows Qwen2-Audio's format (prompt template, audio tokens, tool syntax, OpenAI mapping)."""
