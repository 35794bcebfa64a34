"""Realistic simulated products of every sensor in the registry, from real ECOSTRESS surface spectra.

``simulate_corpus(out_dir, ...)`` writes products through ``data_prep.formats.write_product`` plus
material-map sidecars and a ``manifest.json``; the submodules expose the pieces (library, spectral
responses, atmosphere, scene layout, rendering) for tests and other tools.
"""

from data_prep.simulate.library import GRID_NM, load_library, select_materials

__all__ = ["GRID_NM", "load_library", "select_materials"]
