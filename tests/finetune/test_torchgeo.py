"""finetune.torchgeo: the encoder as a backbone over TorchGeo samples; TorchGeo / TerraTorch when installed."""

import pytest
import torch

from finetune.torchgeo import SpecFMBackbone, specfm_encoder

C, H = 6, 16


def _sample(seed: int = 0) -> dict:
    """One sample in TorchGeo's contract (as HySpecNet11k.__getitem__ returns it): image [C, H, W], wavelength [C]
    in micrometres, res in metres, and position keys the backbone ignores."""
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.randn(C, H, H, generator=g), "wavelength": torch.linspace(0.45, 2.3, C),
            "x": torch.tensor(500000.0), "y": torch.tensor(4200000.0), "t": torch.tensor(0.0), "res": torch.tensor(30)}


def test_backbone_takes_a_torchgeo_sample_and_returns_the_encoders_feature_maps(encoder):
    bb = SpecFMBackbone(encoder, sensor="enmap", level="L2").eval()
    s = _sample()
    with torch.no_grad():
        maps = bb(s)
        ref = encoder.features(s["image"][None], s["wavelength"] * 1000, None, sensor="enmap", level="L2",
                               layers=encoder.default_layers(), gsd=torch.tensor([30.0]))
    p = encoder.patch_size
    assert bb.out_channels == [encoder.embed_dim] * 4 and len(maps) == 4
    assert all(m.shape == (1, encoder.embed_dim, H // p, H // p) for m in maps)
    for m, r in zip(maps, ref):  # micrometres converted, tokens laid out on the patch grid
        assert torch.allclose(m, r.transpose(1, 2).reshape(m.shape), atol=1e-5)


def test_backbone_takes_stacked_samples_and_plain_tensors(encoder):
    bb = SpecFMBackbone(encoder, wavelengths=torch.linspace(450, 2300, C), output="tokens").eval()
    a, b = _sample(0), _sample(1)
    batch = {k: torch.stack([a[k], b[k]]) for k in a}  # what torchgeo.datasets.stack_samples makes
    with torch.no_grad():
        from_batch = bb(batch)
        from_tensor = bb(batch["image"])  # band table from the constructor; no res: no GSD
        one = bb(a)
    assert from_batch[0].shape == (2, (H // encoder.patch_size) ** 2, encoder.embed_dim)
    assert torch.allclose(from_batch[-1][:1], one[-1], atol=1e-5)
    assert from_tensor[-1].shape == from_batch[-1].shape
    with pytest.raises(ValueError, match="needs the band table"):
        SpecFMBackbone(encoder)(batch["image"])
    with pytest.raises(ValueError, match="backbone_checkpoint"):
        specfm_encoder()


def test_with_torchgeo_installed_its_collate_feeds_the_backbone(encoder):
    pytest.importorskip("torchgeo", reason="the [torchgeo] extra is not installed (torchgeo needs torchvision)")
    from torchgeo.datasets.utils import stack_samples

    bb = SpecFMBackbone(encoder).eval()
    with torch.no_grad():
        maps = bb(stack_samples([_sample(0), _sample(1)]))
    assert maps[0].shape[0] == 2 and bb.out_channels[0] == maps[0].shape[1]


def test_with_terratorch_installed_the_backbone_is_registered(debug_export):
    pytest.importorskip("terratorch", reason="terratorch is not installed")
    from terratorch.registry import BACKBONE_REGISTRY

    import finetune.torchgeo  # noqa: F401  (registers on import)

    assert "specfm_encoder" in BACKBONE_REGISTRY
    bb = BACKBONE_REGISTRY.build("specfm_encoder", backbone_checkpoint=str(debug_export),
                                 wavelengths=torch.linspace(450, 2300, C))
    assert isinstance(bb, SpecFMBackbone) and len(bb(torch.randn(1, C, H, H))) == 4
