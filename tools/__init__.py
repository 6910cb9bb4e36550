"""Developer tools beside the package (not shipped by `pip install`): benchmarks (`python -m tools.bench`), the
GPU smoke round (`python -m tools.smoke`), the checking judge the speed benchmark judges through, the generator of
the bundled checkable prompt sets, and the fault hooks tests load through SELFPLAY_HOOKS. Run them from a checkout."""
