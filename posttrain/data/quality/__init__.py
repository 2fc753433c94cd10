"""Data quality: `posttrain data clean` (`clean.run_clean`) and its steps, one module each.

`items` (the record stream), `filters`, `verify`, `dedup`, `decontam`, `mix`; each step is a
function over a stream of `Item`s that marks the ones it drops.
"""
