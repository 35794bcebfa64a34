"""Data preparation: sensor registry, product readers, simulator, tiling, Zarr patch stores."""
