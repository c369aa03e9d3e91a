import csv

from conftest import TINY, run_cli


def test_grid_multirun_writes_a_summary_and_survives_a_failing_job(tmp_path, corpus_file, cache_dir):
    args = [*TINY, f"data.path={corpus_file}", f"paths.cache_dir={cache_dir}", "sample=null", "test=false"]
    result = run_cli("-m", *args, "model.num_layers=1,2", "model.num_heads=2,3", "hydra.sweep.dir=sweep", cwd=tmp_path)
    sweep = tmp_path / "sweep"
    rows = list(csv.DictReader((sweep / "summary.csv").open()))
    assert len(rows) == 4
    for r in rows:  # the two jobs with 3 heads fail (3 does not divide width 32); the others still run
        assert r["status"] == ("failed" if "model.num_heads=3" in r["overrides"] else "completed")
        assert ("num_heads=3 does not divide" in r["error"]) == (r["status"] == "failed")
    assert all(float(r["objective"]) == float(r["best_val_loss"]) for r in rows if r["status"] == "completed")
    for r in rows:  # every completed job is a complete run directory
        if r["status"] == "completed":
            assert (sweep / r["job"] / "results.json").is_file()
            assert (sweep / r["job"] / "checkpoints" / "last.ckpt").is_file()
    table = (sweep / "summary.md").read_text()
    assert "| model.num_heads=3 model.num_layers=1 | failed |" in table
    assert "Sweep summary" in result.stdout + result.stderr
