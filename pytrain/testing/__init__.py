"""References and comparison helpers shared by pytrain's tests and benchmarks."""
