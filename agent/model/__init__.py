"""What the agent knows about the model it talks to: one module per family knows its format
(prompt template, audio tokens, tool syntax), behind `family.Family`, chosen from the
checkpoint's `model_type`: `qwen2_audio` (the default), `qwen2_5_omni`, `voxtral`."""
