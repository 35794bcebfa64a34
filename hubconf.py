"""torch.hub entry points of specfm, for a local clone (nothing is downloaded)::

    enc = torch.hub.load("path/to/specfm", "encoder", source="local", path="runs/demo/export/stage3_all/hf")

``path`` is an export folder (``encoder.safetensors`` + ``model_args.json``), a release folder
(``config.json`` + ``model.safetensors``, see ``pretrain/release.py``), or a Hugging Face hub id resolved
from the local cache (``download=True`` to fetch it; needs ``huggingface_hub``). The result is the
``finetune.Encoder`` that ``finetune.load_encoder`` returns (eval mode, sensor/level names).
"""

dependencies = ["torch", "numpy", "safetensors", "yaml", "zarr"]


def encoder(path: str, map_location: str = "cpu", download: bool = False):
    """The pretrained encoder at ``path`` (see the module docstring)."""
    import finetune

    return finetune.load_encoder(path, map_location=map_location, download=download)
