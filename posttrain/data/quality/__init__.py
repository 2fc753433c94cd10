"""Data quality: `posttrain data clean` (`clean.run_clean`) and its steps, one module each.

`items` (the record stream), `filters`, `verify`, `dedup`, `decontam`, `perplexity`, `judge`,
`mix`; each step is a function over a stream of `Item`s that marks the ones it drops.
`ray_engine` runs the per-record steps on Ray Data; `section` is a training recipe's ``clean:``.
"""
