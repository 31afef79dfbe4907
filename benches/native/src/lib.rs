//! Criterion benchmarks of cml-core live in `benches/`; this library is empty.
