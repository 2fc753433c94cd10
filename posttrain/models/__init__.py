"""Models: the embedded default tokenizer, HF loading/saving, GGUF import, PEFT wrapping.

Submodules (imported explicitly, so `import posttrain.models` stays cheap):
- `tokenizer`: `train_default_tokenizer`, `DEFAULT_TEMPLATE` and the marker constants;
- `load`: `load_model`, `load_tokenizer`, `save_hf_folder`, `resolve_dtype`, `count_parameters`;
- `gguf`: `import_gguf` (llama.cpp file -> plain fp32 HF folder);
- `peft`: `PeftConfig`, `apply_peft`, `export_model`, `load_peft_model`.
- `heads`: `ScalarHead`, `RewardModel` (reward models, PPO critic), `load_reward_model`.
"""
