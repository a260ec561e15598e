"""Host-side datasets (numpy + PIL): MVTec AD / VisA, long-tail noisy splits, the synthetic
default, generated feature benchmarks and OOD sets. Import the submodules directly, e.g.
``from tailedcore_jax.data import mvtec, longtail, synthetic``."""
