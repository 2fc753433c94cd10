"""Synthetic data from a model: sampling completions and keeping the good ones.

- `posttrain.synth.generate`: ``posttrain generate`` -- k completions per prompt into JSONL
  (`run_generate`), with per-token log-probs, finish reasons and the sampling settings.
- `posttrain.synth.rejection`: ``posttrain filter`` -- rejection sampling (`run_filter`): score
  every completion with registered rewards, keep the best (or all above a threshold), drop
  duplicates, write SFT chat records and a pass-rate / pass@k report.
"""
