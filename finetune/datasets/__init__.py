"""Datasets of the downstream tasks: public benchmarks in their distributed form and synthetic tasks."""

from finetune.datasets.base import (
    ChangeData,
    ClassificationData,
    DatasetError,
    FusionData,
    SegmentationData,
    Spectral,
    normalise,
    read_array,
)
from finetune.datasets.colocated import CrossSensorData, synthetic_cross_sensor
from finetune.datasets.public import (
    load_aerorit,
    load_bay_area,
    load_change_mat,
    load_fusion_pair,
    load_mshfnet,
    load_qingpu,
    load_santa_barbara,
    load_scene_dir,
    load_scene_folders,
    load_segmentation,
)
from finetune.datasets.synthetic import (
    synthetic_change,
    synthetic_classification,
    synthetic_fusion,
    synthetic_segmentation,
)

#: name -> loader, as named by the ``data: {loader: ...}`` block of finetune/benchmark configs.
LOADERS = {
    "aerorit": load_aerorit,
    "whu_h2sr": load_scene_dir,
    "qingpu": load_qingpu,
    "segmentation": load_segmentation,
    "bay_area": load_bay_area,
    "santa_barbara": load_santa_barbara,
    "change_mat": load_change_mat,
    "hrssc": load_scene_folders,
    "scene_folders": load_scene_folders,
    "emit_planetscope": load_fusion_pair,
    "mshfnet": load_mshfnet,
    "synthetic_segmentation": synthetic_segmentation,
    "synthetic_change": synthetic_change,
    "synthetic_classification": synthetic_classification,
    "synthetic_fusion": synthetic_fusion,
    "synthetic_cross_sensor": synthetic_cross_sensor,
}


#: loaders whose ``**kw`` go to another reader than load_segmentation (for the unknown-key check)
FORWARDS = {load_bay_area: load_change_mat, load_santa_barbara: load_change_mat}  # others: load_segmentation


def load_dataset(spec: dict):
    """Build a dataset from a config block ``{loader: name, <loader kwargs>}``."""
    spec = dict(spec)
    name = spec.pop("loader", None)
    if name not in LOADERS:
        raise DatasetError(f"unknown dataset loader {name!r}; expected one of {sorted(LOADERS)}")
    fn = LOADERS[name]
    import inspect

    params = inspect.signature(fn).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):  # **kw forwarded to the generic reader
        params = {**params, **inspect.signature(FORWARDS.get(fn, load_segmentation)).parameters}
    unknown = sorted(set(spec) - {k for k, p in params.items() if p.kind is not p.VAR_KEYWORD})
    if unknown:
        raise DatasetError(f"dataset loader {name!r} got unknown key(s) {unknown}; it takes "
                           f"{sorted(k for k, p in params.items() if p.kind is not p.VAR_KEYWORD)}")
    return fn(**spec)


__all__ = ["LOADERS", "ChangeData", "ClassificationData", "CrossSensorData", "DatasetError", "FusionData", "SegmentationData",
           "Spectral", "load_dataset", "normalise", "read_array"] + [f.__name__ for f in LOADERS.values()]
