//! Synthesises SD2-architecture checkpoints with seeded random weights: the embedded tiny
//! model the demo runs without any download, and full-size SD2.1 checkpoints for benchmarks.
