"""bench/quality.py on a given export: every task against both random-init families and the raw input, one JSON
line, and the probes fitted with BLAS on one thread (its spinning worker threads made them ~30x slower on a
loaded 2-core box)."""

import json

from threadpoolctl import threadpool_info

from bench import quality


def test_quality_bench_scores_an_export_against_random_and_raw(debug_export, monkeypatch, capsys):
    blas_threads = []
    real_probe = quality.scene_probe

    def probe(*a, **k):
        blas_threads.append(max(d["num_threads"] for d in threadpool_info() if d["user_api"] == "blas"))
        return real_probe(*a, **k)

    monkeypatch.setattr(quality, "scene_probe", probe)
    assert quality.main(["--checkpoint", str(debug_export), "--scenes", "6", "--seeds", "2", "--repeats", "2",
                         "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(out["tasks"]) == set(quality.TASKS)
    for task, row in out["tasks"].items():
        fams = {"pretrained", "random_project_init", "random_torch_init", "raw_spectrum"}
        assert fams <= set(row), (task, row)
        assert len(row["random_project_init"]["per_encoder"]) == 2  # --seeds encoders per init
        assert isinstance(row["beats"], bool) and "margin_se" in row
    assert out["all_beat"] == all(r["beats"] for r in out["tasks"].values())
    assert blas_threads and set(blas_threads) == {1}  # one call per encoder (pretrained + 2 x 2 random + raw)
